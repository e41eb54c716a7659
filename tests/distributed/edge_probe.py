"""One training step on awkward micro-batches, in any layout; rank 0 saves the loss and every gradient.

    torchrun --nproc_per_node=N tests/distributed/edge_probe.py OUT.pt [hydra overrides…]

The step's four micro-batches are built here, not read from shards, so their contents are certain:
a text-only pack, a pack of images, another text-only pack and a video-only pack. Dealt over dp=2
(micro-batch i to dp rank i mod 2), one data-parallel rank sees no visual input at all while the other
runs the ViT twice; with dp=1 the ViT gets a micro-batch without media between ones with media (under
pipeline parallelism too). Gradients are assembled as in `grad_probe.py`.

A second engine then trains one real step at stage3_sft (ViT frozen) on the same micro-batches and
records the frozen parameters that got a gradient or optimizer state (there must be none).

With `engine=deepspeed` (ZeRO-2/3, dp only) the same two steps run on the DeepSpeed engine; its reduced
gradients are read at full shape by parameter name (`DeepSpeedEngine.full_grads`) and compared with the
one-process reference's `named_grads`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SLOTS = 256
PACKS = (
    [("text", 37)],
    [("text", 5), ("image", (1, 8, 12)), ("text", 9)],
    [("text", 61)],
    [("text", 4), ("video", (2, 8, 8)), ("text", 6)],
)


def micro_batches(model_cfg, dp_rank: int, dp: int) -> list:
    """This data-parallel rank's share of the four packs (same random contents on every rank)."""
    import torch

    from qvl_train.tools.hf_parity import synthetic_packed_batch

    gen = torch.Generator().manual_seed(0)
    packs = []
    for segments in PACKS:
        batch = synthetic_packed_batch(model_cfg, SLOTS, segments, gen)
        kinds = [k for s in batch.sample_ids for k, _ in segments if k != "text"]
        merge = model_cfg.vision.spatial_merge_size**2
        batch.num_visual_tokens = int(batch.grid_thw.prod(-1).sum()) // merge if kinds else 0
        batch.media_kind = torch.tensor([int(k == "video") for k in kinds]) if "video" in kinds else None
        packs.append(batch)
    return packs[dp_rank::dp]


def frozen_with_state(engine, frozen: set[str]) -> list[str]:
    """Frozen parameters that have a gradient or optimizer state after a step."""
    named = dict(engine.model.named_parameters())
    bad = [n for n in frozen if named[n].grad is not None]
    if engine.sharded is not None:  # the distributed optimizer keeps state per slice of DDP's gradient buffers only
        return bad + [n for n in frozen if hasattr(named[n], "main_grad")]
    return bad + [n for n in frozen if engine.optimizer.state.get(named[n])]


def deepspeed_run(cfg, dims, batches) -> dict:
    """engine=deepspeed: the full step's loss and reduced gradients (captured before the update, by
    parameter name) and the stage3_sft step's loss and frozen parameters with a gradient or state."""
    from qvl_train.config import StageConfig
    from qvl_train.engines.deepspeed import DeepSpeedEngine

    def engine(stage: StageConfig) -> DeepSpeedEngine:
        return DeepSpeedEngine(cfg.model, cfg.parallel, cfg.optim, stage, cfg.engine, dims, seed=cfg.seed,
                               max_steps=10, micro_batches_per_step=len(PACKS))

    full, grads = engine(StageConfig("stage2_multitask")), {}
    step = full.ds.step

    def capturing(*args, **kwargs):
        grads.update(full.full_grads())
        return step(*args, **kwargs)

    full.ds.step = capturing
    result = full.train_step(batches, 0)
    sft = engine(StageConfig("stage3_sft"))
    named = dict(sft.model.named_parameters())
    frozen = {n for n, p in named.items() if not p.requires_grad}
    sft_result = sft.train_step(batches, 0)
    return {"loss": result.loss, "named_grads": grads, "visual_tokens": result.visual_tokens,
            "sft_loss": sft_result.loss, "frozen": len(frozen),
            "frozen_with_state": sorted(n for n in frozen if named[n].grad is not None) + sorted(
                n for n, g in sft.full_grads().items() if n in frozen)}


def main(out: str, *overrides: str) -> None:
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from qvl_train.config import StageConfig, register_configs, to_train_config
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.parallel.dims import ParallelDims
    from tests.distributed.grad_probe import assemble, full_gradients, gather_main_grads

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = to_train_config(compose("train", overrides=list(overrides)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_config(cfg.parallel, world)
    dims.initialize()
    batches = micro_batches(cfg.model, dims.dp_rank, dims.dp)
    if cfg.engine.name == "deepspeed":
        found = deepspeed_run(cfg, dims, batches)
        if dims.rank == 0:
            torch.save(found, out)
        dims.destroy()
        return

    def engine(stage: StageConfig) -> MegatronEngine:
        return MegatronEngine(cfg.model, cfg.parallel, cfg.optim, stage, dims, seed=cfg.seed, max_steps=10)

    full = engine(StageConfig("stage2_multitask"))
    full.optimizer.step = lambda *a, **k: None  # keep the step's gradients as they are
    full._update = lambda *a, **k: None  # (the distributed optimizer's update path too)
    result = full.train_step(batches, 0)
    if full.sharded is not None:  # optim.distributed: each rank holds its slice of the reduced gradients
        gather_main_grads(full)
    pieces = [None] * dims.world_size
    dist.all_gather_object(pieces, full_gradients(full.model))

    sft = engine(StageConfig("stage3_sft"))
    frozen = {n for n, p in sft.model.named_parameters() if not p.requires_grad}
    sft_result = sft.train_step(batches, 0)
    bad = [None] * dims.world_size
    dist.all_gather_object(bad, frozen_with_state(sft, frozen))
    # one process (tp = pp = 1): every gradient whole, by parameter name (what the DeepSpeed run is compared with)
    named_grads = {n: p.grad.detach().clone() for n, p in full.model.named_parameters()
                   if p.grad is not None} if dims.world_size == 1 else {}
    if dims.rank == 0:
        torch.save({
            "loss": result.loss, "grads": assemble([p for rank in pieces for p in rank]), "named_grads": named_grads,
            "visual_tokens": result.visual_tokens, "sft_loss": sft_result.loss,
            "frozen": len(frozen), "frozen_with_state": sorted({n for rank in bad for n in rank}),
        }, out)
    dims.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
