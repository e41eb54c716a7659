"""`optim.distributed=true` (megatron DDP + DistributedOptimizer) in two gloo processes, fp32 on CPU.

One spawn of 2 processes checks, against a single-process engine that each rank runs on the whole
global batch (its own one-rank groups, the engine's own AdamW):
  * dp=2 with the distributed optimizer gives the same losses, grad norms and per-module norms over
    3 steps (clipping active, per-module learning rates, warmup + cosine) and the same parameters
    after the first step, within 1e-5 relative;
  * the AdamW state really is sharded: each rank holds about half of the moments, both halves
    together exactly one moment pair per trainable element;
  * train.dtype=bf16 keeps bf16 parameters in the model and fp32 master weights in the optimizer,
    and weights loaded without optimizer state (model.init_from) become the masters;
  * a frozen module (stage3_sft: ViT) gets no gradient buffer and no optimizer state;
  * a step with a non-finite loss is skipped (no parameter moves, the optimizer's step count stays).
Checkpoint save / resume through launch/train.py is in test_layouts.py.
"""

from __future__ import annotations

import torch

STEPS = 3
MICRO = 2  # micro-batches per data-parallel rank and step


def _batches(cfg, step: int, rank: int):
    from qvl_train.models.tiny import packed_batch

    return [packed_batch(cfg, seed=100 * step + 10 * rank + m) for m in range(MICRO)]


def _one_rank_dims():
    """A dp=1 ParallelDims over singleton groups (collectives of the engine stay on this rank)."""
    import torch.distributed as dist

    from qvl_train.parallel.dims import ParallelDims

    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    own = singles[dist.get_rank()]
    return ParallelDims(tp=1, pp=1, cp=1, dp=1, world_size=1,
                        groups={"tp": own, "pp": own, "dp": own, "cp": own, "dp_cp": own, "mp": own, "world": own})


def _real_dims():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from qvl_train.parallel.dims import ParallelDims, megatron_groups

    dims = ParallelDims(tp=1, pp=1, cp=1, dp=2, world_size=2)
    dims.rank, dims.dp_rank = dist.get_rank(), ps.get_data_parallel_rank()
    dims.groups = megatron_groups()
    return dims


def _engine(dims, distributed: bool, stage: str = "stage2_multitask", dtype=torch.float32):
    from qvl_train.config import OptimConfig, ParallelConfig, StageConfig
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.models.tiny import tiny_model_config

    optim = OptimConfig(lr=1e-3, lr_vit=5e-4, lr_projector=2e-3, min_lr=1e-4, warmup_steps=2,
                        clip_grad=0.5, distributed=distributed)  # clipping active: norms are ~1-3
    return MegatronEngine(tiny_model_config(), ParallelConfig(), optim, StageConfig(stage), dims,
                          seed=5, max_steps=STEPS, dtype=dtype)


def _same_parameters(ref, other) -> None:
    theirs = dict(other.model.named_parameters())
    for name, p in ref.model.named_parameters():
        assert float((theirs[name] - p).norm()) <= 1e-5 * float(p.norm()), name


def _check(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state as ps

    from qvl_train.models.tiny import tiny_model_config

    ps.initialize_model_parallel()
    cfg = tiny_model_config()
    ref, dist_engine = _engine(_one_rank_dims(), False), _engine(_real_dims(), True)
    for step in range(STEPS):
        every = [b for r in range(world_size) for b in _batches(cfg, step, r)]
        a = ref.train_step(every, step)
        b = dist_engine.train_step(_batches(cfg, step, rank), step)
        assert not a.skipped and not b.skipped
        assert abs(b.loss - a.loss) <= 1e-5 * abs(a.loss), (step, a.loss, b.loss)
        assert abs(b.grad_norm - a.grad_norm) <= 1e-5 * a.grad_norm, (step, a.grad_norm, b.grad_norm)
        assert a.grad_norm > 0.5  # so clipping was applied
        for m, v in a.module_grad_norms.items():
            assert abs(b.module_grad_norms[m] - v) <= 1e-5 * v, (step, m)
        assert b.lrs == a.lrs and dist_engine.current_lr() == a.lrs["llm"]
        if step == 0:  # every parameter after the first update (later, Adam's m/√v turns the rounding
            _same_parameters(ref, dist_engine)  # noise of the key bias' zero gradient into ±lr steps)

    # ZeRO-1: this rank's moments cover about half of the trainable elements; both ranks all of them.
    trainable = sum(p.numel() for p in ref.model.parameters() if p.requires_grad)
    inner = dist_engine.optimizer.optimizer
    mine = sum(inner.state[p]["exp_avg"].numel() for g in inner.param_groups for p in g["params"])
    total = torch.tensor([mine])
    torch.distributed.all_reduce(total)
    assert int(total) == trainable and 0.45 < mine / trainable < 0.55, (mine, trainable)
    assert dist_engine.sharded.state_bytes() == 2 * 4 * mine  # fp32 params: no separate master copy

    # A non-finite step is skipped on every rank: no parameter moves, the step count stays.
    poisoned = "projector.linear_fc1.weight"
    with torch.no_grad():
        theirs = dict(dist_engine.model.named_parameters())
        theirs[poisoned][0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in theirs.items() if n != poisoned}
    count = dist_engine.optimizer_step_count()
    assert count == STEPS and dist_engine.train_step(_batches(cfg, STEPS, rank), STEPS).skipped
    assert all(torch.equal(before[n], p) for n, p in theirs.items() if n != poisoned)
    assert dist_engine.optimizer_step_count() == count

    # bf16 parameters, fp32 masters; the frozen ViT has no gradient buffer and no optimizer state.
    bf16 = _engine(_real_dims(), True, stage="stage3_sft", dtype=torch.bfloat16)
    vit = [p for n, p in bf16.model.named_parameters() if n.startswith("vision.")]
    before = [p.detach().clone() for p in vit]
    result = bf16.train_step(_batches(cfg, 0, rank), 0)
    assert not result.skipped and result.module_grad_norms["vision"] == 0.0
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    masters = [main for *_, main in bf16.sharded._shards]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters)  # finer than bf16 after a step
    assert all(torch.equal(b, p) for b, p in zip(before, vit))
    assert not any(hasattr(p, "main_grad") for p in vit)
    assert not any(p in bf16.sharded.ddps[0].param_to_bucket_group for p in vit)
    assert bf16.sharded.state_bytes() == 3 * 4 * sum(m.numel() for m in masters)  # 2 moments + master
    # Weights loaded without optimizer state (model.init_from) replace the masters too.
    halved = {k: v * 0.5 if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in bf16.model.state_dict().items()}
    bf16.load_sharded({"model": halved}, with_optimizer=False)
    assert all(torch.equal(m, m.bfloat16().float()) for m in masters)


def test_distributed_optimizer_matches_single_process_and_shards_state():
    from qvl_train.compat.megatron_cpu import spawn_gloo

    spawn_gloo(_check, 2)


def test_cuda_type_names_only_inside_the_wrapped_calls():
    """The compat layer's `tensor.type()` renaming (for megatron's dtype asserts) is scoped."""
    from qvl_train.compat.megatron_cpu import _cuda_type_names, install_cpu_compat

    install_cpu_compat()
    t = torch.zeros(2)
    with _cuda_type_names():
        assert (t.type(), t.bfloat16().type()) == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor")
        assert t.type(torch.float64).dtype == torch.float64  # conversions untouched
    assert t.type() == "torch.FloatTensor"
