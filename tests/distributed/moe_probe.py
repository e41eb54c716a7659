"""MoE training runs for `test_moe_expert_parallel.py`: `torchrun --nproc_per_node=N moe_probe.py OUT EP CKPT`.

Builds the megatron engine for the tiny Qwen3-VL MoE at `parallel.ep=EP` (world N, dp = N) and trains 3
steps on the same 4 packed micro-batches per step (data-parallel rank r takes its share), with clipping
active (`clip_grad` below the first steps' norms, so the expert part of the global norm matters). In
layer 2 expert 3 is never chosen (a router hook drops it from the routing), so one expert per step gets
no token: under ep=2 a rank holds an expert that computes nothing and must still reduce and step.

* N > 1: the engine's own AdamW, then `optim.distributed=true` (megatron DDP + DistributedOptimizer, the
  experts in their own expert-data-parallel buffers and optimizer) saving a checkpoint after step 1 to
  CKPT, then a fresh distributed engine that resumes it and trains steps 2-3.
* N = 1: the engine's own AdamW (the reference), then a distributed engine that resumes the ep=N
  checkpoint in CKPT (if any) in one process: the expert optimizer state re-sharded from ep=2 to ep=1.

Rank 0 saves, per run, losses, aux losses, expert loads, grad norms and the first step's gradients (before
clipping) gathered to full shape, with every local expert renamed to its global index.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` imports, launched as a script

STEPS, RESUME_AT = 3, 1
GRIDS = [[(1, 4, 4), (1, 4, 6)], [(1, 6, 4)], [None, (1, 4, 4)], [(2, 4, 4)]]
UNUSED_EXPERT, IN_LAYER = 3, 2  # layer_number is 1-based


def main(out: str, ep: int, ckpt: str) -> None:
    from qvl_train.checkpoint.manager import CheckpointManager
    from qvl_train.config import OptimConfig, ParallelConfig, StageConfig
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.models.tiny import packed_batch, tiny_qwen3_vl_moe_config
    from qvl_train.parallel.dims import ParallelDims

    cfg = tiny_qwen3_vl_moe_config(attention_backend="sdpa_loop")
    parallel = ParallelConfig(ep=ep)
    dims = ParallelDims.from_config(parallel, int(os.environ.get("WORLD_SIZE", "1")))
    dims.initialize()
    batches = [packed_batch(cfg, grids=g, texts=[(5, 7)] * len(g), seed=i) for i, g in enumerate(GRIDS)]
    mine = batches[dims.dp_rank :: dims.dp]
    local_experts = cfg.llm.num_experts // ep

    def engine(distributed: bool) -> MegatronEngine:
        optim = OptimConfig(lr=1e-3, clip_grad=1.0, weight_decay=0.0, distributed=distributed)
        built = MegatronEngine(cfg, parallel, optim, StageConfig(), dims, seed=0, max_steps=STEPS)
        _drop_expert(built.model)
        return built

    manager = CheckpointManager(Path(ckpt), dims)
    record = {"per_param": _train(engine(False), mine, range(STEPS), local_experts)}
    if dims.world_size > 1:
        record["distributed"] = _train(engine(True), mine, range(STEPS), local_experts, manager)
    if (Path(ckpt) / "latest").exists():
        resumed = engine(True)
        state, _ = manager.restore(resumed, resume="auto", init_from=None)
        record["resumed"] = _train(resumed, mine, range(state.step, STEPS), local_experts)
    if dims.rank == 0:
        torch.save(record, out)
    dims.destroy()


def _drop_expert(model) -> None:
    """Route no token of layer IN_LAYER to expert UNUSED_EXPERT (runs before the engine's load counter)."""
    from megatron.core.transformer.moe.router import TopKRouter

    def hook(router, inputs, output):
        if router.layer_number != IN_LAYER:
            return output
        probs, routing_map = output
        keep = torch.ones(routing_map.shape[-1], dtype=torch.bool, device=routing_map.device)
        keep[UNUSED_EXPERT] = False
        return probs * keep, routing_map & keep

    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(hook, prepend=True)


def _train(engine, batches, steps, local_experts: int, manager=None) -> dict:
    from qvl_train.checkpoint.manager import TrainState

    record: dict = {"loss": [], "aux": [], "load": [], "norm": []}
    update = engine._update

    def update_after_capture(lrs, grad_norm):  # the step's gradients before clipping and the update
        if "grads" not in record:
            record["grads"] = _full_grads(engine, local_experts)
        update(lrs, grad_norm)

    engine._update = update_after_capture
    for step in steps:
        res = engine.train_step(batches, step)
        for key, value in (("loss", res.loss), ("aux", res.moe_aux_loss), ("load", res.expert_load), ("norm", res.grad_norm)):
            record[key].append(value)
        if manager is not None and step + 1 == RESUME_AT:
            manager.save(engine, TrainState(step=step + 1))
    return record


def _full_grads(engine, local_experts: int) -> dict[str, torch.Tensor]:
    """Every gradient under its single-process name: local expert j of expert rank r is expert r·n + j."""
    from megatron.core import parallel_state as ps

    from tests.distributed.grad_probe import gather_main_grads

    if engine.sharded is not None:
        gather_main_grads(engine)
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
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
