"""The parts of a megatron `TransformerConfig` every tower of this package shares.

Fusions are off unless CUDA is up: megatron's fused bias-GELU / bias-dropout / softmax / RoPE
kernels are CUDA (or TorchScript-on-CUDA) paths. Dropout is 0 (pretraining of VLMs runs without it,
and `VarlenAttention` has none). Weights are allocated on the CPU first
(`use_cpu_initialization=True`: megatron then moves nothing to a GPU itself; the engine moves the
model) and not initialised by megatron (`perform_initialization=False`): `init_weights` does it,
independently of the parallel layout, or a checkpoint is loaded.

`Execution` carries the run-time choices that are not architecture (train.recompute, the resolved
train.fp8 and parallel.sp) into every tower's config; `run_layer` applies full recomputation where a tower
runs its layers one by one (window attention, DeepStack) instead of through `TransformerBlock`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig

from qvl_train.models.fp8 import Fp8Recipe, TorchFp8Config, fp8_context

__all__ = ["make_transformer_config", "Execution", "run_layer", "SequenceShards", "without_sequence_parallel"]


@dataclass(frozen=True)
class Execution:
    """How the towers run, independent of the architecture: activation recomputation and FP8."""

    recompute: str = "none"
    """none | selective (core attention recomputed in the backward) | full (whole layers)."""
    fp8: Optional[str] = None
    """megatron's `TransformerConfig.fp8` ("hybrid" / "e4m3", Transformer Engine) or None; see `specs.resolve_fp8`."""
    fp8_torch: Optional[Fp8Recipe] = None
    """The torch FP8 backend's recipe (`train.fp8_backend=torch`) or None; see `models/fp8.py`."""
    sequence_parallel: bool = False
    """`parallel.sp`: activations outside attention / MLP split along the sequence over TP ranks."""

    def transformer_kwargs(self) -> dict:
        """The `TransformerConfig` fields these choices set."""
        kw: dict = {}
        if self.recompute == "selective":
            kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
        elif self.recompute == "full":
            kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        elif self.recompute != "none":
            raise ValueError(f"recompute={self.recompute!r}; valid: none, selective, full")
        if self.fp8:
            kw.update(fp8=self.fp8)
        return kw


def run_layer(
    layer, hidden_states: torch.Tensor, rotary_pos_emb: torch.Tensor, packed_seq_params, padding_mask=None
) -> torch.Tensor:
    """One `TransformerLayer` on `[s, 1, h]` (no mask, packed segments), fully recomputed in the backward
    when its config asks for `recompute_granularity="full"` (what `TransformerBlock` does for its own loop).
    `padding_mask` `[1, s]` (True = padding) reaches MoE routers (see `LanguageModel.forward`)."""

    def forward(h: torch.Tensor) -> torch.Tensor:
        return layer(
            hidden_states=h, attention_mask=None, rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )[0]

    with fp8_context(layer.config):  # what TransformerBlock opens around its layers (TE FP8; else nothing)
        return _run_layer(layer, forward, hidden_states)


def _run_layer(layer, forward, hidden_states: torch.Tensor) -> torch.Tensor:
    if not (layer.config.recompute_granularity == "full" and layer.training and torch.is_grad_enabled()):
        return forward(hidden_states)
    if layer.config.fp8:  # TE's checkpoint keeps the FP8 scaling state consistent across the recompute
        from megatron.core import parallel_state
        from megatron.core.extensions.transformer_engine import te_checkpoint  # noqa: PLC0415 (TE only with FP8)

        return te_checkpoint(
            forward, False, tensor_parallel.get_cuda_rng_tracker, parallel_state.get_tensor_model_parallel_group(),
            hidden_states,
        )
    return tensor_parallel.checkpoint(forward, False, hidden_states)


def make_transformer_config(
    *, dtype: torch.dtype, tp: int, pp: int, execution: Execution = Execution(), **arch
) -> TransformerConfig:
    """`TransformerConfig` from architecture fields (`arch`), the shared runtime settings and `execution`."""
    fused = torch.cuda.is_available()
    config_cls, extra = (TorchFp8Config, {"torch_fp8": execution.fp8_torch}) if execution.fp8_torch else (TransformerConfig, {})
    return config_cls(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=execution.sequence_parallel and tp > 1,
        context_parallel_size=1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **execution.transformer_kwargs(),
        **extra,
        **arch,
    )


def without_sequence_parallel(config: TransformerConfig) -> TransformerConfig:
    """The config for layers that take whole, replicated rows (mergers, the output layer): megatron's
    parallel linears would otherwise all-gather their input along the sequence once more."""
    return replace(config, sequence_parallel=False) if config.sequence_parallel else config


class SequenceShards:
    """Sequence parallelism for a tower that builds its own `[s, 1, h]` input: split the rows over the
    tensor-parallel ranks before the layers and gather them after (megatron's layers then all-gather
    before attention / MLP and reduce-scatter after). `s` is padded with zero rows to a multiple of
    the TP size; padding rows lie past the last `cu_seqlens` segment, so attention ignores them, and
    they are dropped on the way out. A no-op when the config has no sequence parallelism.

    Gradients: `scatter`'s backward all-gathers, so everything upstream (patch embedding, token
    embedding, visual scatter) receives the full, identical gradient on every TP rank; `gather` is
    followed by replicated consumers (mergers, the output layer) whose input gradient is identical
    on every rank, so its backward just keeps this rank's rows.
    """

    def __init__(self, config, rows: int, multiple: int = 1):
        """`multiple`: the rows are also padded to a multiple of it (per rank under sequence parallelism);
        the ViTs pass `fp8.fp8_row_multiple(config)` (Transformer Engine's FP8 GEMMs need 16 rows)."""
        from megatron.core import parallel_state

        self.on = bool(config.sequence_parallel)
        self.tp = parallel_state.get_tensor_model_parallel_world_size() if self.on else 1
        self.rows = rows
        self.pad = (-rows) % (self.tp * multiple)

    def scatter(self, h: torch.Tensor) -> torch.Tensor:
        if self.pad:
            h = torch.nn.functional.pad(h, (0, 0) * (h.dim() - 1) + (0, self.pad))
        if not self.on:
            return h
        return tensor_parallel.scatter_to_sequence_parallel_region(h)

    def pad_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row inputs every rank needs whole (RoPE angles): padded to the gathered length."""
        if not self.pad:
            return x
        return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, self.pad))

    def mask(self, padding_S: torch.Tensor) -> torch.Tensor:
        """A per-row bool mask `[s]` → this rank's rows `[1, s/tp]` (megatron's `[batch, seq]` padding-mask
        layout); the rows `scatter` pads with are padding too."""
        if self.pad:
            padding_S = torch.cat([padding_S, padding_S.new_ones(self.pad)])
        if self.on:
            padding_S = tensor_parallel.scatter_to_sequence_parallel_region(padding_S.unsqueeze(1)).squeeze(1)
        return padding_S.unsqueeze(0)

    def gather(self, h: torch.Tensor) -> torch.Tensor:
        if self.on:
            h = tensor_parallel.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
        return h[: self.rows] if self.pad else h
