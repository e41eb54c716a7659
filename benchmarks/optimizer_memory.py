"""Optimizer-state bytes per rank: the engine's own AdamW vs megatron's distributed optimizer.

    python benchmarks/optimizer_memory.py

Runs the tiny experiment's model (`qvl_train.models.tiny`) at dp=1 and dp=2 (gloo, CPU), fp32 and bf16,
with `optim.distributed` off and on; after one training step (AdamW's state exists only then) it counts
the bytes of optimizer state each rank holds: the two moments, plus the fp32 master copies that the
distributed optimizer keeps for bf16 parameters (its fp32 "masters" of fp32 parameters are views of the
parameters, not copies). Prints a markdown table (max over ranks).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _state_bytes(engine) -> int:
    if engine.sharded is not None:
        return engine.sharded.state_bytes()
    return sum(t.numel() * t.element_size() for st in engine.optimizer.state.values()
               for k, t in st.items() if k != "step")


def _measure(rank: int, world_size: int, out: list) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from qvl_train.config import OptimConfig, ParallelConfig, StageConfig
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.models.tiny import packed_batch, tiny_model_config
    from qvl_train.parallel.dims import ParallelDims, megatron_groups

    ps.initialize_model_parallel()
    dims = ParallelDims(tp=1, pp=1, cp=1, dp=world_size, world_size=world_size)
    dims.rank, dims.dp_rank = rank, ps.get_data_parallel_rank()
    dims.groups = megatron_groups()
    cfg = tiny_model_config()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for distributed in (False, True):
            engine = MegatronEngine(cfg, ParallelConfig(), OptimConfig(lr=1e-4, distributed=distributed),
                                    StageConfig(), dims, seed=0, max_steps=1, dtype=dtype)
            engine.train_step([packed_batch(cfg, seed=rank)], 0)
            params = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
            mine = torch.tensor([_state_bytes(engine)], dtype=torch.float64)
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            rows.append((str(dtype).removeprefix("torch."), distributed, params, int(mine)))
    if rank == 0:
        out.extend(rows)
        print_table(world_size, rows)


def print_table(dp: int, rows) -> None:
    for dtype, distributed, params, nbytes in rows:
        print(f"| {dp} | {dtype} | {'true' if distributed else 'false'} | {params:,} | {nbytes / 2**20:.1f} MiB "
              f"| {nbytes / params:.1f} |", flush=True)


def main() -> None:
    from qvl_train.compat.megatron_cpu import spawn_gloo

    print("| dp | train.dtype | optim.distributed | trainable params | optimizer state per rank | bytes / param |")
    print("| --- | --- | --- | --- | --- | --- |")
    for world_size in (1, 2):
        spawn_gloo(_measure, world_size, [])


if __name__ == "__main__":
    main()
