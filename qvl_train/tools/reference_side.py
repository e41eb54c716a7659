"""The reference side of `qvl_train/tools/reference.py`: runs under `.venv-ref` (transformers 5.x).

This file imports only the standard library, torch, safetensors and transformers, never `qvl_train`
(the reference interpreter has no megatron-core). It is both the runner and a home for reference
functions:

    <ref python> qvl_train/tools/reference_side.py --file FILE.py --function NAME --dir TMP

loads FILE.py by path (it must define `NAME(tensors: dict[str, Tensor], **args) -> dict[str, Tensor]`),
reads `TMP/inputs.safetensors` and `TMP/args.json`, calls the function and writes
`TMP/outputs.safetensors`. No pickle in either direction.

Reference functions here (Qwen3.5 Gated DeltaNet, transformers 5.25
`models/qwen3_5/modeling_qwen3_5.py`):
- `hf_gated_delta_rule`: HF's `torch_chunk_gated_delta_rule` and `torch_recurrent_gated_delta_rule`
  run per sample of a packed batch, with gradients of all inputs.
- `hf_gated_deltanet_layer`: HF's `Qwen3_5GatedDeltaNet` with given weights, run per sample, with
  the gradient wrt its input.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch


def _samples(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def hf_gated_delta_rule(tensors: dict, use_qk_l2norm: bool = True) -> dict:
    """HF's chunked and recurrent gated delta rule, sample by sample, with input gradients.

    tensors: q, k [1, T, Hk, Dk], v [1, T, Hv, Dv], g, beta [1, T, Hv], cu_seqlens [n+1], grad_out
    [1, T, Hv, Dv]. Returns `{chunk,recurrent}_{out,dq,dk,dv,dg,dbeta}` over the packed T, where the
    gradients are those of `sum(out * grad_out)`.
    """
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    names = ("q", "k", "v", "g", "beta")
    result = {}
    for kind, fn in (("chunk", m.torch_chunk_gated_delta_rule), ("recurrent", m.torch_recurrent_gated_delta_rule)):
        leaves = {n: tensors[n].detach().clone().requires_grad_(True) for n in names}
        outs = []
        for s, e in _samples(tensors["cu_seqlens"]):
            out, _ = fn(*(leaves[n][:, s:e] for n in ("q", "k", "v")), g=leaves["g"][:, s:e],
                        beta=leaves["beta"][:, s:e], use_qk_l2norm_in_kernel=use_qk_l2norm)
            outs.append(out)
        out = torch.cat(outs, dim=1)
        (out * tensors["grad_out"]).sum().backward()
        result[f"{kind}_out"] = out.detach()
        for n in names:
            result[f"{kind}_d{n}"] = leaves[n].grad
    return result


def hf_gated_deltanet_layer(tensors: dict, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                            head_v_dim: int, conv_kernel: int, eps: float) -> dict:
    """HF's `Qwen3_5GatedDeltaNet` (fp32) on each sample of a packed input, with d(input).

    tensors: `x` [T, hidden], `cu_seqlens` [n+1], `grad_out` [T, hidden], and the layer's HF state
    under `w.<name>` (`w.in_proj_qkv.weight`, ...). Returns `out` [T, hidden], `dx` [T, hidden] and
    `d.<name>` for every parameter.
    """
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    cfg = Qwen3_5TextConfig(hidden_size=hidden_size, linear_num_key_heads=num_k_heads,
                            linear_num_value_heads=num_v_heads, linear_key_head_dim=head_k_dim,
                            linear_value_head_dim=head_v_dim, linear_conv_kernel_dim=conv_kernel, rms_norm_eps=eps,
                            num_hidden_layers=1, layer_types=["linear_attention"], hidden_act="silu")
    layer = Qwen3_5GatedDeltaNet(cfg, layer_idx=0).float()
    state = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
    layer.load_state_dict(state, strict=True)
    x = tensors["x"].detach().clone().requires_grad_(True)
    outs = [layer(x[None, s:e])[0] for s, e in _samples(tensors["cu_seqlens"])]
    out = torch.cat(outs, dim=0)
    (out * tensors["grad_out"]).sum().backward()
    result = {"out": out.detach(), "dx": x.grad}
    result.update({f"d.{n}": p.grad for n, p in layer.named_parameters()})
    return result


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file, save_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", required=True, help="python file defining the function")
    ap.add_argument("--function", required=True)
    ap.add_argument("--dir", required=True, help="exchange dir with inputs.safetensors and args.json")
    ns = ap.parse_args(argv)
    if not ns.function.isidentifier():
        raise SystemExit(f"function name {ns.function!r} is not a Python identifier")
    spec = importlib.util.spec_from_file_location("_qvl_reference_module", ns.file)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {ns.file} as a python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, ns.function, None)
    if not callable(fn):
        raise SystemExit(f"{ns.file} defines no function {ns.function!r}")
    exchange = Path(ns.dir)
    tensors = load_file(str(exchange / "inputs.safetensors"))
    args = json.loads((exchange / "args.json").read_text())
    if not isinstance(args, dict):
        raise SystemExit("args.json must hold a JSON object")
    out = fn(tensors, **args)
    if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise SystemExit(f"{ns.function} must return a dict of tensors")
    save_file({k: v.detach().contiguous().clone() for k, v in out.items()}, str(exchange / "outputs.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
