"""Run the conversion and parity tools through a model built in a parallel layout.

`launch/convert.py import-hf --tp N --pp N [--ep N]` and `python -m qvl_train.tools.hf_parity --tp N --pp N
[--ep N]` start the layout's processes of this module themselves (torchrun, gloo on CPU / NCCL on GPUs;
`pp · max(tp, ep)` processes):

* ``import`` — every rank builds its pipeline stage in the layout, fills its tensor-parallel shards
  from the HF weights (`fill_from_full`), and megatron's `dist_checkpointing.save` writes the
  checkpoint from all ranks: the sharded save path of a real run, and the same checkpoint as a
  one-process import (the format is layout-independent).
* ``logits`` — the same model (one after another for each of several checkpoints, in one process
  group) runs the parity inputs through megatron's forward-only pipeline
  schedule; the last stage gathers the vocabulary shards and writes the logits for the parent
  process, which compares them with the HF model it ran itself (the framework side never calls
  into transformers).

Every rank reads the HF safetensors whole and keeps only its shards: simple and exact, but the
host needs the memory of one full copy per process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def world_size(tp: int, pp: int, ep: int = 1) -> int:
    """Processes of a (tp, pp, ep) layout: the experts of a MoE model are split over `ep` ranks that
    are tensor-parallel or data-parallel copies of the dense part (megatron's rule: ep·pp divides it)."""
    wide, narrow = max(tp, ep), min(tp, ep)
    if wide % narrow:
        raise ValueError(f"--tp {tp} and --ep {ep}: one must divide the other")
    return pp * wide


def launch(command: str, tp: int, pp: int, *args: str, ep: int = 1) -> None:
    """Run `command` of this module on the layout's local processes; raises with their output on failure."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size(tp, pp, ep)}", f"--master_port={port}",
        "-m", "qvl_train.tools.layout", command, "--tp", str(tp), "--pp", str(pp), "--ep", str(ep), *args,
    ]
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"layout run (tp={tp}, pp={pp}, ep={ep}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _global_names(model: torch.nn.Module) -> dict[int, str]:
    """Parameter storage → its name in a one-process model: pipeline stages number their layers from 0
    (megatron's `layer_number` is global) and expert-parallel ranks their local experts from 0 (rank r
    of `ep` holds experts r·n … r·n + n - 1)."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers, experts = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            head, _, _ = name.rpartition(".")
            layers[f"{name}."] = f"{head}.{module.layer_number - 1}."
        elif isinstance(module, SequentialMLP):
            first = module.ep_group.rank() * module.num_local_experts
            for j in range(module.num_local_experts):
                experts[f"{name}.local_experts.{j}."] = f"{name}.local_experts.{first + j}."
    names = {}
    for name, p in model.named_parameters():
        for renames in (experts, layers):  # experts first: their keys use the stage's local layer names
            for old, new in renames.items():
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
        names[p.untyped_storage().data_ptr()] = name
    return names


@torch.no_grad()
def fill_from_full(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy into this rank's parameters their slices of the one-process state dict `full`.

    The model's own `sharded_state_dict` says where each local tensor sits in the global one (tensor
    parallel offsets, SwiGLU gate/up halves); the pipeline stage's layer numbers map local names to
    global ones. A tied output weight on the last stage reads the embedding (its checkpoint key)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    names = _global_names(model)
    filled = set()
    for item in nested_values(model.sharded_state_dict()):
        for st in (nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]):
            if not isinstance(st, ShardedTensor) or st.data is None:
                continue
            name = names.get(st.data.untyped_storage().data_ptr())
            if name is None:
                continue  # a buffer, not a parameter
            source = full[name] if name in full else full[st.key]
            lead = st.prepend_axis_num
            index = tuple(slice(o, o + n) for o, n in zip(st.global_offset[lead:], st.data.shape))
            st.data.copy_(source[index].to(st.data.dtype))
            filled.add(st.data.untyped_storage().data_ptr())
    missing = [n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in filled]
    if missing:
        raise RuntimeError(f"no HF tensor reached parameters {missing[:5]}")


def stage_logits(model, batch) -> torch.Tensor | None:
    """Full-vocabulary logits `[L, V]` of `batch` through the pipeline (forward only), on the last
    stage; None on the other stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def forward_step(data_iterator, m):
        out = m(next(data_iterator), return_logits=True)
        return out, lambda o: (o.sum() * 0.0, {"logits": o.detach()})

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=batch.num_slots, micro_batch_size=1, forward_only=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(collected[0]["logits"]).float()


def _world(tp: int, pp: int, ep: int):
    """The process group and megatron-core's groups of the (tp, pp, ep) layout (once per launch)."""
    from qvl_train.config import ParallelConfig
    from qvl_train.parallel.dims import ParallelDims

    dims = ParallelDims.from_config(ParallelConfig(tp=tp, pp=pp, ep=ep), int(os.environ["WORLD_SIZE"]))
    dims.initialize()
    return dims


def first_stage_layers(num_layers: int, pp: int, deepstack: int = 0) -> int | None:
    """LLM layers of the first pipeline stage for `pp` stages: None (an even split) where that works,
    otherwise the split closest to even whose other stages share the rest equally and whose first
    stage holds the `deepstack` layers Qwen3-VL adds ViT features to (a layout-independent checkpoint
    does not care how a conversion splits the layers)."""
    if pp < 2 or (num_layers % pp == 0 and num_layers // pp >= deepstack):
        return None
    fits = [f for f in range(max(1, deepstack), num_layers - pp + 2) if (num_layers - f) % (pp - 1) == 0]
    if not fits:
        raise ValueError(
            f"{num_layers} LLM layers cannot be split over {pp} pipeline stages with {deepstack} DeepStack layers "
            "on the first; use fewer stages (--pp)"
        )
    return min(fits, key=lambda f: abs(f - num_layers / pp))


def _parallel(cfg, tp: int, pp: int, ep: int):
    """The model's parallel config in the launched layout: megatron's MoE layers take
    sequence-parallel activations under tensor parallelism; an uneven first stage where needed."""
    from qvl_train.config import ParallelConfig

    deep = len(getattr(cfg.vision, "deepstack_visual_indexes", []) or [])
    return ParallelConfig(
        tp=tp, pp=pp, ep=ep, sp=bool(cfg.llm.num_experts) and tp > 1,
        first_stage_layers=first_stage_layers(cfg.llm.num_layers, pp, deep),
    )


def _stage_model(cfg, parallel, dims, hf_dir: Path, dtype: torch.dtype):
    from qvl_train.models import build_model
    from qvl_train.models.hf_convert import hf_to_ours
    from qvl_train.tools.convert import load_hf_state_dict

    model = build_model(cfg, parallel, pre_process=dims.is_first_stage, post_process=dims.is_last_stage, dtype=dtype)
    fill_from_full(model, hf_to_ours(load_hf_state_dict(hf_dir), cfg))
    return model


def _import(args) -> None:
    import json

    from megatron.core import dist_checkpointing

    from qvl_train.tools.convert import model_config_from_hf

    hf_dir = Path(args.hf_dir)
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    dims = _world(args.tp, args.pp, args.ep)
    model = _stage_model(cfg, _parallel(cfg, args.tp, args.pp, args.ep), dims, hf_dir, torch.float32)
    from dataclasses import asdict

    from qvl_train.checkpoint.manager import TrainState

    dist_checkpointing.save({"model": model.sharded_state_dict(), "train_state": asdict(TrainState())}, args.step_dir)
    torch.distributed.barrier()
    dims.destroy()


def _logits(args) -> None:
    """Logits of every `--batches` file through the model of the matching `--hf-dir`, all in this one
    launch (one process group; the models are built one after another)."""
    if not len(args.hf_dir) == len(args.batches) == len(args.out):
        raise SystemExit("logits: give one --batches and one --out per --hf-dir")
    dims = _world(args.tp, args.pp, args.ep)
    for hf_dir, batches, out in zip(args.hf_dir, args.batches, args.out):
        _model_logits(Path(hf_dir), batches, out, args, dims)
    dims.destroy()


def _model_logits(hf_dir: Path, batches_file: str, out_file: str, args, dims) -> None:
    import json

    from qvl_train.tools.convert import model_config_from_hf

    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    cfg.attention_backend = args.attention_backend
    parallel = _parallel(cfg, args.tp, args.pp, args.ep)
    dtype = getattr(torch, args.dtype)
    model = _stage_model(cfg, parallel, dims, hf_dir, dtype).to(dims.device).eval()
    model.config.pipeline_dtype = dtype
    batches = torch.load(batches_file, weights_only=False)  # written by the parent hf_parity process
    out = {}
    for kind, batch in batches.items():
        length = batch.num_slots
        if parallel.sp:  # the packed length must split over the TP ranks: pad slots outside every sample
            batch = _pad_slots(batch, -length % args.tp)
        batch = batch.to(dims.device)
        batch.pixel_values = batch.pixel_values.to(dtype)
        logits = stage_logits(model, batch)
        if logits is not None:
            out[kind] = logits[:length].cpu()
    if dims.is_last_stage and dims.tp_rank == 0 and dims.dp_rank == 0:
        torch.save(out, out_file)


def _pad_slots(batch, n: int):
    """`batch` with `n` padding slots at the end (no sample, no label), as the packer pads."""
    if not n:
        return batch
    from dataclasses import replace

    from data_pipelines.schema import IGNORE_INDEX
    from data_pipelines.text import PAD_ID

    return replace(
        batch,
        input_ids=torch.cat([batch.input_ids, torch.full((n,), PAD_ID, dtype=batch.input_ids.dtype)]),
        labels=torch.cat([batch.labels, torch.full((n,), IGNORE_INDEX, dtype=batch.labels.dtype)]),
        position_ids=torch.cat([batch.position_ids, batch.position_ids.new_zeros(batch.position_ids.shape[0], n)], dim=1),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--step-dir", required=True)
    lg = sub.add_parser("logits")
    lg.add_argument("--hf-dir", required=True, nargs="+")
    lg.add_argument("--batches", required=True, nargs="+")
    lg.add_argument("--out", required=True, nargs="+")
    lg.add_argument("--dtype", default="float32")
    lg.add_argument("--attention-backend", default="auto")
    for s in (imp, lg):
        s.add_argument("--tp", type=int, default=1)
        s.add_argument("--pp", type=int, default=1)
        s.add_argument("--ep", type=int, default=1)
    args = p.parse_args(argv)
    {"import": _import, "logits": _logits}[args.cmd](args)


if __name__ == "__main__":  # dist_checkpointing saves through worker processes
    main()
