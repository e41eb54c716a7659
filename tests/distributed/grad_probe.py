"""One training step in any layout; rank 0 saves the loss and every gradient at its full global shape.

    torchrun --nproc_per_node=N tests/distributed/grad_probe.py OUT.pt DATA_ROOT [hydra overrides…]

The optimizer update is skipped, so the gradients are exactly what the step computed after its
reductions (data-parallel sum, tensor-parallel partial sums). With `optim.distributed=true` they live
in megatron DDP's `main_grad` buffers, of which each rank holds the reduced sum of its own slice only:
the slices are all-gathered over each bucket's (expert-)data-parallel group first. Each gradient is put together from the
model's own `sharded_state_dict` (global key, global shape, this rank's offsets, SwiGLU halves
included), read through the gradients instead of the weights: the assembly knows nothing about the
layout, so the same file format comes out of tp, pp, dp, sp, ep runs and of one process (under parallel.vpp
`engine.model` is the rank's `ModelChunks`, whose sharded state dict covers every chunk).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def full_gradients(model) -> list[tuple[str, tuple, tuple, "object"]]:
    """This rank's primary (replica 0) gradient pieces as (key, global shape, global offset, tensor)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    swapped = [(p, p.data) for p in model.parameters() if p.grad is not None]
    grad_storage = set()
    for p, _ in swapped:
        p.data = p.grad
        grad_storage.add(p.grad.untyped_storage().data_ptr())
    try:
        pieces = []
        for item in nested_values(model.sharded_state_dict()):
            items = list(nested_values(item.build())) if isinstance(item, ShardedTensorFactory) else [item]
            for st in items:
                if not isinstance(st, ShardedTensor) or st.data is None:
                    continue
                if st.data.untyped_storage().data_ptr() not in grad_storage:
                    continue  # a frozen weight: no gradient
                replica = st.replica_id if isinstance(st.replica_id, tuple) else (st.replica_id,)
                if any(replica):
                    continue
                pieces.append((st.key, tuple(st.global_shape), tuple(st.global_offset), st.data.detach().clone()))
    finally:
        for p, data in swapped:
            p.data = data
    return pieces


def gather_main_grads(engine) -> None:
    """optim.distributed: all-gather every bucket's reduce-scattered gradient slices over the group that
    reduced them (dense: dp × cp, routed experts: expert-dp), then expose `main_grad` as `.grad`."""
    import torch
    import torch.distributed as dist

    for ddp in engine.sharded.ddps:
        for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            comm, size = group.intra_distributed_optimizer_instance_group, group.intra_distributed_optimizer_instance_size
            for bucket in group.buckets:
                shards = list(bucket.grad_data.chunk(size))
                dist.all_gather(shards, shards[comm.rank()].clone(), group=comm)
                bucket.grad_data.copy_(torch.cat(shards))
    for p in engine.model.parameters():
        if hasattr(p, "main_grad"):
            if p.dtype != p.main_grad.dtype:  # bf16 weights, fp32 gradient buffers (train.dtype=bf16)
                p.grad_dtype = None
            p.grad = p.main_grad


def assemble(pieces) -> dict:
    import torch

    full: dict = {}
    for key, shape, offset, data in pieces:
        t = full.setdefault(key, torch.full(shape, float("nan"), dtype=torch.float32))
        lead = len(shape) - data.dim()  # prepended axes (layer number, expert) have extent 1 here
        index = tuple(slice(o, o + 1) for o in offset[:lead]) + tuple(
            slice(o, o + n) for o, n in zip(offset[lead:], data.shape)
        )
        t[index] = data.float().reshape(t[index].shape)
    for key, t in full.items():
        if torch.isnan(t).any():
            raise RuntimeError(f"gradient {key}: some entries were written by no rank")
    return full


def main(out: str, data_root: str, *overrides: str) -> None:
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from data_pipelines.stream import StepLoader
    from qvl_train.config import register_configs, to_train_config
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.parallel.dims import ParallelDims

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = to_train_config(compose("train", overrides=[f"cluster.data_root={data_root}", *overrides]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.validate(world)
    dims = ParallelDims.from_config(cfg.parallel, world)
    dims.initialize()
    engine = MegatronEngine(
        cfg.model, cfg.parallel, cfg.optim, cfg.stage, dims, seed=cfg.seed, max_steps=cfg.train.max_steps,
        recompute=cfg.train.recompute, dtype=torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32,
    )
    engine._update = lambda *a, **k: None  # keep the gradients of step 1 as they are (no clip, no step)
    if cfg.model.lora.enabled:  # B = 0 at init would leave every A without gradient: draw B (layout-independent)
        from tests.unit.test_lora import _fill_b

        _fill_b(engine.model)
    loader = StepLoader(cfg.data, micro_batches_per_step=cfg.micro_batches_per_step(), dp_rank=dims.dp_rank, dp_size=dims.dp)
    result = engine.train_step(loader.next_step(), 0)
    if engine.sharded is not None:
        gather_main_grads(engine)
    pieces = [None] * dims.world_size
    dist.all_gather_object(pieces, full_gradients(engine.model))
    if dims.rank == 0:
        grads = assemble([p for rank in pieces for p in rank])
        model = engine.model
        sp = {"llm": model.config.sequence_parallel, "vision": model.vision.config.sequence_parallel}
        torch.save({
            "loss": result.loss, "grad_norm": result.grad_norm, "grads": grads, "sequence_parallel": sp,
            "moe_aux_loss": result.moe_aux_loss, "expert_load": result.expert_load,  # MoE models (None / {} otherwise)
            "mtp_loss": result.mtp_loss,  # the Qwen3.5 MTP head's loss (model.mtp_loss_weight > 0; else None)
        }, out)
    loader.close()
    dims.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
