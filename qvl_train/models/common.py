"""The parts of a megatron `TransformerConfig` every tower of this package shares.

Fusions are off unless CUDA is up: megatron's fused bias-GELU / bias-dropout / softmax / RoPE
kernels are CUDA (or TorchScript-on-CUDA) paths. Dropout is 0 (pretraining of VLMs runs without it,
and `VarlenAttention` has none). Weights are allocated on the CPU first
(`use_cpu_initialization=True`: megatron then moves nothing to a GPU itself; the engine moves the
model) and not initialised by megatron (`perform_initialization=False`): `init_weights` does it,
independently of the parallel layout, or a checkpoint is loaded.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["make_transformer_config"]


def make_transformer_config(*, dtype: torch.dtype, tp: int, pp: int, **arch) -> TransformerConfig:
    """`TransformerConfig` from architecture fields (`arch`) plus the shared runtime settings."""
    fused = torch.cuda.is_available()
    return TransformerConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
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
        **arch,
    )
