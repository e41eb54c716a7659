"""What both engines share: parameter groups, the learning-rate schedule, stage freezing, step counts.

`engines/megatron.py` and `engines/deepspeed.py` train the same model with the same optimizer
grouping and schedule; this module is that common part, so the two cannot drift apart.

The optimizer has one pair of parameter groups (decayed / not decayed: norms and biases) per module,
each with its own peak learning rate (`optim.lr_vit`, `optim.lr_projector`, `optim.lr`) and the same
schedule shape (`lr_at`). Parameter names start with the module (`vision.`, `projector.`, `llm.`;
under `parallel.vpp` after a `chunks.K.` prefix, see `parallel/pipeline.local_name`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from data_pipelines.schema import PackedBatch
from qvl_train.config import ModelConfig, OptimConfig, StageConfig
from qvl_train.parallel.dims import ParallelDims
from qvl_train.parallel.pipeline import local_name

MODULES = ("vision", "projector", "llm")


def module_of(name: str) -> str:
    """The module (vision / projector / llm) a parameter name belongs to; anything else counts as llm."""
    head = local_name(name).split(".", 1)[0]
    return head if head in MODULES else "llm"


def step_counts(batches: list[PackedBatch], model_cfg: ModelConfig, dims: ParallelDims) -> dict:
    """The step's token / sample / FLOP counts over every data-parallel rank (StepResult fields).

    An all-gather rather than an all-reduce: the same few numbers per data-parallel rank arrive at
    every rank, so the sums and the token imbalance come from one small collective. Called before
    the forward: `label_tokens` is the denominator of the step's loss."""
    from qvl_train.monitor.flops import packed_batch_flops

    local = torch.tensor(
        [
            sum(b.num_label_tokens for b in batches),
            sum(b.num_tokens for b in batches),
            sum(b.num_samples for b in batches),
            sum(b.num_visual_tokens for b in batches),
            sum(b.num_slots for b in batches),
            float(sum(packed_batch_flops(model_cfg, b).training for b in batches)),
        ],
        dtype=torch.float64,
        device=dims.device,  # collectives run on the device (NCCL takes CUDA tensors only)
    )
    per_rank = [torch.empty_like(local) for _ in range(dims.dp)]
    dist.all_gather(per_rank, local, group=dims.groups["dp"])
    per_rank_LK = torch.stack(per_rank)  # [dp, 6]; integer counts are exact in float64
    label_tokens, tokens, samples, visual, slots = (int(x) for x in per_rank_LK[:, :5].sum(0).tolist())
    rank_tokens = per_rank_LK[:, 1]
    return dict(
        label_tokens=label_tokens, tokens=tokens, samples=samples, visual_tokens=visual, slots=slots,
        flops=float(per_rank_LK[:, 5].sum()),
        dp_imbalance=float(rank_tokens.max() / rank_tokens.mean()) if float(rank_tokens.sum()) > 0 else 1.0,
    )


def _decay_scale(style: str, progress: float) -> float:
    """1 → 0 as progress goes 0 → 1: linear, cosine (half period) or 1 - sqrt (WSD's sqrt decay)."""
    if style == "linear":
        return 1.0 - progress
    if style == "sqrt":
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: OptimConfig, max_steps: int, peak: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the decay schedule.

    `peak` (default `cfg.lr`) gives a module its own rate with the same shape: warmup to `peak`,
    decay to `cfg.min_lr · peak / cfg.lr`. `wsd` holds the peak until the last
    `cfg.wsd_decay_steps(max_steps)` steps, which decay (`cfg.decay_style`) to the floor, reached at
    the last step (`max_steps - 1`).
    """
    peak = cfg.lr if peak is None else peak
    floor = cfg.min_lr * peak / cfg.lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay = cfg.wsd_decay_steps(max_steps)
        progress = min(1.0, max(0.0, (step - (max_steps - decay) + 1) / decay))
        return floor + (peak - floor) * _decay_scale(cfg.decay_style, progress)
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (peak - floor) * _decay_scale(cfg.schedule, progress)


def module_lrs(step: int, cfg: OptimConfig, max_steps: int) -> dict[str, float]:
    """Learning rate of each module (vision / projector / llm) at `step`."""
    return {m: lr_at(step, cfg, max_steps, peak) for m, peak in cfg.peak_lrs().items()}


def param_groups(named_params, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: per module, decayed weights and (weight_decay=0) norms / biases; empty groups dropped.

    Each group carries `module` so the step can set its learning rate; the LLM's groups come first
    (`param_groups[0]["lr"]` is the LLM's rate whenever the LLM trains).
    """
    groups = {(m, d): [] for m in ("llm", "projector", "vision") for d in (True, False)}
    for name, param in named_params:
        if param.requires_grad:
            decays = not (param.ndim < 2 or name.endswith(".bias"))
            groups[(module_of(name), decays)].append(param)
    peaks = cfg.peak_lrs()
    return [
        {"params": ps, "module": m, "lr": peaks[m], "weight_decay": cfg.weight_decay if d else 0.0}
        for (m, d), ps in groups.items() if ps
    ]


def llm_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LLM's learning rate in `optimizer` (groups from `param_groups`; the first group's when the
    LLM is frozen), for the metrics line."""
    groups = optimizer.param_groups
    return next((g["lr"] for g in groups if g["module"] == "llm"), groups[0]["lr"])


def apply_stage(model: torch.nn.Module, stage: StageConfig, lora: bool = False) -> None:
    """Only the stage's modules receive gradients (names start with vision. / projector. / llm.);
    with `lora`, only their adapter factors (base weights frozen: no gradient, no optimizer state)."""
    from qvl_train.models.lora import is_lora_param

    for name, param in model.named_parameters():
        param.requires_grad_(local_name(name).split(".", 1)[0] in stage.trainable and (not lora or is_lora_param(name)))
