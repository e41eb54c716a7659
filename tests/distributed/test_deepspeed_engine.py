"""`engine=deepspeed` (ZeRO-2 and ZeRO-3) in two gloo processes, fp32 on CPU, against the megatron engine
in one process (each rank runs it on the whole global batch over its own one-rank groups).

One spawn checks, for ZeRO-2 and ZeRO-3 with dp=2 (ZeRO-3 partitioning every parameter):
  * the losses, grad norms and per-module norms of 5 steps (clipping active, per-module learning
    rates, warmup + cosine) and, after the first step, every gradient (gathered to full shape from
    the ZeRO partitions) within 1e-5 relative of the one-process megatron engine;
  * the partitions are real: each rank's AdamW moments cover about half of the trainable elements;
  * a checkpoint round trip through the CheckpointManager: saved after step 4, loaded into a fresh
    engine of the same stage, step 5 gives the same loss as the uninterrupted run (AdamW moments
    and step count restored), and the saved weights equal the live full weights (what export-hf and
    model.init_from read); the one-process megatron engine resumes the ZeRO-3 checkpoint (the same
    `per_param` format) and its step 5 is the same;
  * a step with a non-finite gradient is skipped (ZeRO-2): no master weight moves, the step count stays;
  * a frozen module (stage3_sft: ViT) gets no gradient and no optimizer state and does not move.
The command-line run (`launch/train.py engine=deepspeed`) is in tests/e2e/test_deepspeed_train.py.
"""

from __future__ import annotations

import torch

STEPS = 5
SAVE_AT = 4
MICRO = 2  # micro-batches per data-parallel rank and step


def _batches(cfg, step: int, rank: int):
    from qvl_train.models.tiny import packed_batch

    return [packed_batch(cfg, seed=100 * step + 10 * rank + m) for m in range(MICRO)]


def _optim():
    from qvl_train.config import OptimConfig

    return OptimConfig(lr=1e-3, lr_vit=5e-4, lr_projector=2e-3, min_lr=1e-4, warmup_steps=2, clip_grad=0.5)


def _reference(stage: str = "stage2_multitask"):
    """The megatron engine as one process: dp=1 over singleton groups (its collectives stay on this rank)."""
    import torch.distributed as dist

    from qvl_train.config import ParallelConfig, StageConfig
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.models.tiny import tiny_model_config
    from qvl_train.parallel.dims import ParallelDims

    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    own = singles[dist.get_rank()]
    dims = ParallelDims(tp=1, pp=1, cp=1, dp=1, world_size=1,
                        groups={"tp": own, "pp": own, "dp": own, "cp": own, "dp_cp": own, "mp": own, "world": own})
    return MegatronEngine(tiny_model_config(), ParallelConfig(), _optim(), StageConfig(stage), dims,
                          seed=5, max_steps=STEPS)


def _deepspeed(zero_stage: int, stage: str = "stage2_multitask"):
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from qvl_train.config import EngineConfig, ParallelConfig, StageConfig
    from qvl_train.engines.deepspeed import DeepSpeedEngine
    from qvl_train.models.tiny import tiny_model_config
    from qvl_train.parallel.dims import ParallelDims

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))  # torchrun sets it; DeepSpeed asserts it
    dims = ParallelDims(tp=1, pp=1, cp=1, dp=2, world_size=2)
    dims.rank, dims.dp_rank = dist.get_rank(), ps.get_data_parallel_rank()
    dims.groups = {"dp": ps.get_data_parallel_group(), "world": dist.group.WORLD}
    engine_cfg = EngineConfig(name="deepspeed", zero_stage=zero_stage, param_persistence_threshold=0)
    return DeepSpeedEngine(tiny_model_config(), ParallelConfig(), _optim(), StageConfig(stage), engine_cfg, dims,
                           seed=5, max_steps=STEPS, micro_batches_per_step=MICRO * 2)


def _close(a: float, b: float, what, rel: float = 1e-5) -> None:
    assert abs(a - b) <= rel * abs(a), (what, a, b)


def _capture_grads(engine) -> dict:
    """Wrap the DeepSpeed step so the reduced full gradients of the next step are kept (before the update)."""
    seen: dict = {}
    step = engine.ds.step

    def capturing(*args, **kwargs):
        if not seen:
            seen.update(engine.full_grads())
        return step(*args, **kwargs)

    engine.ds.step = capturing
    return seen


def _reference_run(cfg, world_size: int):
    """Losses / results of STEPS one-process steps, and the gradients of step 1 (before clipping)."""
    ref = _reference()
    grads: dict = {}
    update = ref._update

    def capturing(lrs, norm):
        if not grads:
            grads.update({n: p.grad.detach().clone() for n, p in ref._params})
        return update(lrs, norm)

    ref._update = capturing
    results = [ref.train_step([b for r in range(world_size) for b in _batches(cfg, s, r)], s) for s in range(STEPS)]
    return results, grads


def _check_zero(zero_stage: int, rank: int, cfg, ref_results, ref_grads, tmp: str) -> None:
    from qvl_train.checkpoint.manager import CheckpointManager, TrainState

    engine = _deepspeed(zero_stage)
    grads = _capture_grads(engine)
    ckpt = CheckpointManager(f"{tmp}/zero{zero_stage}", engine.dims)
    for step in range(STEPS):
        got, want = engine.train_step(_batches(cfg, step, rank), step), ref_results[step]
        assert not got.skipped
        _close(want.loss, got.loss, (zero_stage, step, "loss"))
        # after the first update Adam turns rounding noise (the key bias' zero gradient, a different
        # summation order over ranks) into ±lr steps: later norms agree to 1e-4, the losses to 1e-5
        rel = 1e-5 if step == 0 else 1e-4
        _close(want.grad_norm, got.grad_norm, (zero_stage, step, "grad norm"), rel)
        for m, v in want.module_grad_norms.items():
            _close(v, got.module_grad_norms[m], (zero_stage, step, m), rel)
        assert got.lrs == want.lrs and engine.current_lr() == want.lrs["llm"]
        assert got.label_tokens == want.label_tokens and got.samples == want.samples
        if step == 0:
            assert sorted(grads) == sorted(ref_grads)
            for name, g_ref in ref_grads.items():
                rel = float((grads[name] - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
                assert rel <= 1e-5, f"ZeRO-{zero_stage}: gradient of {name} differs by {rel:.2e} (relative)"
        if step + 1 == SAVE_AT:
            ckpt.save(engine, TrainState(step=SAVE_AT))
            saved_full = _full_weights(engine)

    # Partitioned optimizer state: this rank's moments cover about half of the trainable elements.
    mine = sum(st["exp_avg"].numel() for st in engine._optimizer_states())
    total = torch.tensor([mine])
    torch.distributed.all_reduce(total)
    trainable = engine.parameter_counts()[0]
    assert int(total) == trainable and 0.4 < mine / trainable < 0.6, (mine, trainable)

    # Resume from step 4 in a fresh engine: the same step 5.
    resumed = _deepspeed(zero_stage)
    state, how = ckpt.restore(resumed, resume="auto", init_from=None)
    assert state.step == SAVE_AT and how.startswith("resumed"), how
    assert resumed.optimizer_step_count() == SAVE_AT
    loaded = _full_weights(resumed)
    assert all(torch.equal(loaded[n], w) for n, w in saved_full.items())
    for step in range(SAVE_AT, STEPS):
        _close(ref_results[step].loss, resumed.train_step(_batches(cfg, step, rank), step).loss, (zero_stage, "resumed", step))

    if zero_stage == 2:  # a non-finite step is skipped on every rank: no master weight moves, the step count stays
        with torch.no_grad():
            dict(resumed.model.named_parameters())["projector.linear_fc1.weight"][0, 0] = float("nan")
        before, count = _full_weights(resumed), resumed.optimizer_step_count()
        assert resumed.train_step(_batches(cfg, STEPS, rank), STEPS).skipped
        after = _full_weights(resumed)
        assert all(torch.equal(w, after[n]) for n, w in before.items()) and resumed.optimizer_step_count() == count


def _full_weights(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine._params}


def _check_frozen(rank: int, cfg) -> None:
    """stage3_sft under ZeRO-3: the ViT gets no gradient, no optimizer state and keeps its weights."""
    engine = _deepspeed(3, stage="stage3_sft")
    vit = [p for n, p in engine.model.named_parameters() if n.startswith("vision.")]
    assert vit and not any(p.requires_grad for p in vit)
    before = engine.sharded_state_dict(with_optimizer=False)["model"]
    result = engine.train_step(_batches(cfg, 0, rank), 0)
    assert not result.skipped and result.module_grad_norms["vision"] == 0.0 and result.module_grad_norms["llm"] > 0
    assert all(not n.startswith("vision.") for n in engine.full_grads())
    moments = torch.tensor([sum(st["exp_avg"].numel() for st in engine._optimizer_states())])
    torch.distributed.all_reduce(moments)
    trainable, total = engine.parameter_counts()
    assert int(moments) == trainable == total - sum(p.ds_numel for p in vit)  # no state for the ViT
    after = engine.sharded_state_dict(with_optimizer=False)["model"]
    for key, sh in before.items():
        if key.startswith("vision.") and torch.is_tensor(getattr(sh, "data", None)):
            assert torch.equal(sh.data, after[key].data), key


def _check_megatron_resumes(cfg, world_size: int, ref_results, tmp: str) -> None:
    """The one-process megatron engine resumes the ZeRO-3 run's checkpoint (weights, AdamW moments per
    parameter name, step count: the same format) and its step 5 is the uninterrupted run's."""
    from qvl_train.checkpoint.manager import CheckpointManager

    ref = _reference()
    state, _ = CheckpointManager(f"{tmp}/zero3", ref.dims).restore(ref, resume="auto", init_from=None)
    assert state.step == SAVE_AT and ref.optimizer_step_count() == SAVE_AT
    got = ref.train_step([b for r in range(world_size) for b in _batches(cfg, SAVE_AT, r)], SAVE_AT)
    _close(ref_results[SAVE_AT].loss, got.loss, "megatron engine resumed from ZeRO-3")


def _check(rank: int, world_size: int, tmp: str) -> None:
    from megatron.core import parallel_state as ps

    from qvl_train.models.tiny import tiny_model_config

    ps.initialize_model_parallel()
    cfg = tiny_model_config()
    ref_results, ref_grads = _reference_run(cfg, world_size)
    assert ref_results[0].grad_norm > 0.5  # so clipping is applied
    for zero_stage in (2, 3):
        _check_zero(zero_stage, rank, cfg, ref_results, ref_grads, tmp)
    _check_megatron_resumes(cfg, world_size, ref_results, tmp)
    _check_frozen(rank, cfg)


def test_deepspeed_zero_matches_single_process_and_resumes(tmp_path):
    from qvl_train.compat.megatron_cpu import spawn_gloo

    spawn_gloo(_check, 2, str(tmp_path))
