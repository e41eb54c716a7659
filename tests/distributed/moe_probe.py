"""One MoE training run for `test_moe_expert_parallel.py`: `torchrun --nproc_per_node=N moe_probe.py OUT EP`.

Builds the megatron engine for the tiny Qwen3-VL MoE at `parallel.ep=EP` (world N, dp = N), trains 3
steps on the same 4 packed micro-batches per step (data-parallel rank r takes its share), and rank 0
saves losses, aux losses, expert loads and the first step's gradients gathered to full shape, with
every local expert renamed to its global index (what `parallel.ep` changes is only where experts live).
"""

from __future__ import annotations

import os
import re
import sys

import torch
import torch.distributed as dist

STEPS, MICRO = 3, 4
GRIDS = [[(1, 4, 4), (1, 4, 6)], [(1, 6, 4)], [None, (1, 4, 4)], [(2, 4, 4)]]


def main(out: str, ep: int) -> None:
    from qvl_train.config import OptimConfig, ParallelConfig, StageConfig
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.models.tiny import packed_batch, tiny_qwen3_vl_moe_config
    from qvl_train.parallel.dims import ParallelDims

    cfg = tiny_qwen3_vl_moe_config(attention_backend="sdpa_loop")
    parallel = ParallelConfig(ep=ep)
    dims = ParallelDims.from_config(parallel, int(os.environ.get("WORLD_SIZE", "1")))
    dims.initialize()
    engine = MegatronEngine(
        cfg, parallel, OptimConfig(lr=1e-3, clip_grad=0.0, weight_decay=0.0), StageConfig(), dims, seed=0, max_steps=STEPS
    )
    batches = [packed_batch(cfg, grids=g, texts=[(5, 7)] * len(g), seed=i) for i, g in enumerate(GRIDS)]
    mine = batches[dims.dp_rank :: dims.dp]
    record: dict = {"loss": [], "aux": [], "load": []}
    for step in range(STEPS):
        res = engine.train_step(mine, step)
        record["loss"].append(res.loss)
        record["aux"].append(res.moe_aux_loss)
        record["load"].append(res.expert_load)
        if step == 0:
            record["grads"] = _full_grads(engine, ep, cfg.llm.num_experts // ep)
    if dims.rank == 0:
        torch.save(record, out)
    dims.destroy()


def _full_grads(engine, ep: int, local_experts: int) -> dict[str, torch.Tensor]:
    """Every gradient under its single-process name: local expert j of expert rank r is expert r·n + j."""
    from megatron.core import parallel_state as ps

    offset = ps.get_expert_model_parallel_rank() * local_experts
    rename = lambda n: re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{int(m.group(1)) + offset}.", n)  # noqa: E731
    mine = {rename(n): p.grad.detach().clone() for n, p in engine.model.named_parameters() if p.grad is not None}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    full: dict[str, torch.Tensor] = {}
    for part in gathered:
        full.update(part)
    return full


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
