"""What `train.py`, the evaluator and the checkpoint manager need from an engine, and what a step returns.

Two engines implement `Engine` — `engines/megatron.py` (every parallel layout) and
`engines/deepspeed.py` (ZeRO over data-parallel ranks) — on the same model, batches, loss and
checkpoint format; `train._build_engine` picks one from `engine.name`. A third engine is one more
class with these members (tests/unit/test_engine_contract.py checks both against this protocol).

Every member is called on every rank (most are collectives): the loop never asks which engine or
which rank it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from data_pipelines.schema import PackedBatch


@dataclass
class StepResult:
    """One optimizer step as the monitor sees it: the same numbers on every rank."""

    loss: float  # global per-label-token mean cross-entropy of the step
    grad_norm: float
    module_grad_norms: dict[str, float]
    tokens: int  # real tokens over all data-parallel ranks
    label_tokens: int
    samples: int
    visual_tokens: int
    slots: int  # token slots (tokens + padding) over all data-parallel ranks
    skipped: bool = False  # non-finite loss or gradient: no update was applied
    flops: float = 0.0  # model FLOPs (forward + backward) of the step over all data-parallel ranks
    dp_imbalance: float = 1.0  # max / mean of real tokens over data-parallel ranks
    timings: dict[str, float] = field(default_factory=dict)  # fwd_bwd_s (this rank's own), optimizer_s (incl. dp sync)
    lrs: dict[str, float] = field(default_factory=dict)  # learning rate of the step per module (vision / projector / llm)
    moe_aux_loss: float | None = None  # MoE: load-balancing loss of the step (not part of `loss`)
    expert_load: dict[int, list[float]] = field(default_factory=dict)  # MoE: layer → routed tokens per expert
    mtp_loss: float | None = None  # model.mtp_loss_weight > 0: the MTP head's per-token mean loss (apart from `loss`)


@runtime_checkable
class Engine(Protocol):
    """This rank's part of the model and its optimizer, behind the members the run needs.

    `isinstance(x, Engine)` checks that the members exist (runtime_checkable), not their signatures.
    """

    model: torch.nn.Module
    """This rank's model (its first chunk's container under `parallel.vpp`); the evaluator hooks its
    `llm.output_layer` to read the greedy predictions."""

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the whole model, each counted once over every rank."""
        ...

    @property
    def optimizer_format(self) -> str:
        """How this engine writes the optimizer state into checkpoints (`per_param`, `distributed`,
        `deepspeed_bf16`); saved next to it so a resume can refuse a format it cannot read."""
        ...

    def check_optimizer_format(self, saved: str) -> None:
        """Raise a RuntimeError that says what to do when a checkpoint's `optimizer_format` is not one
        this engine reads (called before any tensor is loaded)."""
        ...

    def current_lr(self) -> float:
        """The LLM's learning rate as the optimizer holds it (the first group's when the LLM is
        frozen): the `lr` of the metrics line."""
        ...

    def train_step(self, batches: list[PackedBatch], step: int) -> StepResult:
        """One optimizer step over this rank's micro-batches of step `step` (0-based: the learning
        rate is `lr_at(step)`); a non-finite loss or gradient skips the update (`skipped`)."""
        ...

    def eval_step(self, batches: list[PackedBatch]) -> tuple[float, int]:
        """Forward only, no gradient, optimizer untouched → (Σ token cross-entropy, label tokens),
        both summed over every data-parallel rank."""
        ...

    def sharded_state_dict(self, with_optimizer: bool = True, is_loading: bool = False) -> dict:
        """`{"model": ..., "optimizer": ...}` as megatron-core ShardedTensors keyed by layout-independent
        names (`is_loading`: a request to load into, whose tensors need not hold the current values)."""
        ...

    def load_sharded(self, loaded: dict, with_optimizer: bool) -> None:
        """Take the weights (and with `with_optimizer` the optimizer state) of a loaded
        `sharded_state_dict` request."""
        ...

    def optimizer_step_count(self) -> int:
        """AdamW's step count (its bias correction), saved with a checkpoint."""
        ...

    def set_optimizer_step_count(self, n: int) -> None:
        """Restore AdamW's step count on resume."""
        ...
