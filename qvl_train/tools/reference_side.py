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
- `hf_model_grads`: a whole HF model (e.g. `Qwen3_5ForConditionalGeneration`) built from a config.json dict
  with given weights, the summed token cross-entropy of several samples (each run alone), and the gradient
  of every parameter under its runtime name (the gradient parity test of Qwen3.5).
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


def hf_model_grads(tensors: dict, config: dict, architecture: str, samples: list, gdn_form: str = "chunk",
                   dtypes: tuple = ("float32",)) -> dict:
    """The summed cross-entropy of `samples` through an fp32 HF model and the gradient of each of its parameters.

    tensors: the model's weights under `w.<runtime name>` (every parameter; a tied `lm_head.weight` may be left
    out), and per sample `<sample>.<forward argument>` (`input_ids`, pixels, grids, `position_ids` or none) plus
    `<sample>.labels` [T] (-100 = no loss; the label of position i is the target of the logits at i). Each sample
    runs alone, since transformers 5.25's Gated DeltaNet layers carry their state across packed sequences; the
    gradients accumulate over the samples. `gdn_form="recurrent"` swaps the GDN layers' chunked torch fallback for
    transformers' own token-by-token `torch_recurrent_gated_delta_rule` (the definition; the chunked fallback takes
    its log-decay prefix sums in fp32). The model runs once per entry of `dtypes` (`float32`, `float64`: weights
and pixels in that dtype; transformers keeps its own fp32 islands — RMSNorm, rotary, the GDN kernels). Returns
    per dtype `<dtype>.loss` and `<dtype>.g.<name>` for each parameter that got a gradient.
    """
    import torch.nn.functional as F
    import transformers

    if gdn_form not in ("chunk", "recurrent"):
        raise ValueError(f"gdn_form={gdn_form!r}; valid: chunk, recurrent")
    if gdn_form == "recurrent":
        from transformers.models.qwen3_5 import modeling_qwen3_5 as dense

        modules = [dense]
        try:
            from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as moe

            modules.append(moe)
        except ImportError:  # pragma: no cover - a transformers without the MoE model
            pass

        for mod in modules:
            recurrent = mod.torch_recurrent_gated_delta_rule

            def chunk_as_recurrent(query, key, value, g, beta, chunk_size=64, _rec=recurrent, **kw):
                return _rec(query, key, value, g=g, beta=beta, **kw)

            mod.torch_chunk_gated_delta_rule = chunk_as_recurrent
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = dict(config)
    hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
    tied = getattr(hf_config.get_text_config(), "tie_word_embeddings", False)
    out = {}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        model = getattr(transformers, architecture)(hf_config).to(dtype).train()
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
            raise ValueError(f"weights do not fit {architecture}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise ValueError("tie_word_embeddings: lm_head is not the embedding after loading")
        total = torch.zeros((), dtype=torch.float64)
        for name in samples:
            kw = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
            labels = kw.pop("labels")
            kw.pop("second_per_grid_ts", None)
            kw = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}
            if "position_ids" not in kw and ("image_grid_thw" in kw or "video_grid_thw" in kw):
                ids = kw["input_ids"]  # transformers 5.x M-RoPE reads the media tokens from their type (image 1, video 2)
                kw["mm_token_type_ids"] = ((ids == model.config.image_token_id).int()
                                           + 2 * (ids == model.config.video_token_id).int())
            logits = model(**kw, use_cache=False).logits[0]
            loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            loss.backward()
            total += loss.detach().double()
        out[f"{dtype_name}.loss"] = total.reshape(1)
        out.update({f"{dtype_name}.g.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    return out


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
