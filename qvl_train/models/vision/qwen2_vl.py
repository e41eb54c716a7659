"""The Qwen2-VL vision transformer from megatron blocks (HF `Qwen2VisionTransformerPretrainedModel`).

patch embed (a bias-free linear over C·T·p·p, i.e. the HF Conv3d with kernel = stride = (T, p, p)
written as the matmul it is) → `depth` pre-LayerNorm blocks (qkv bias, QuickGELU MLP with biases,
2-D RoPE) attending bidirectionally *within each frame* (each temporal patch of each image/video is
its own attention segment, as HF's `cu_seqlens = repeat_interleave(h·w, t).cumsum()`). No final
norm: the merger (`projector.py`) starts with its own LayerNorm.

The tower always has `pipeline_model_parallel_size=1` in its config (it lives whole on the first
pipeline stage) and shares the tensor-parallel group with the LLM.
"""

from __future__ import annotations

import torch
from megatron.core.activations import quick_gelu
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from qvl_train.config import VisionConfig
from qvl_train.models.common import Execution, SequenceShards, make_transformer_config
from qvl_train.models.fp8 import fp8_row_multiple
from qvl_train.models.rope import vision_rope_freqs
from qvl_train.models.specs import layer_spec

__all__ = ["Qwen2VisionTransformer", "vision_transformer_config", "frame_cu_seqlens"]


def vision_transformer_config(cfg: VisionConfig, *, tp: int, dtype: torch.dtype, execution: Execution = Execution()):
    """The ViT's megatron config (pp = 1: the tower is never split across pipeline stages).

    Norm and MLP follow `cfg.norm` / `cfg.mlp` (LayerNorm + QuickGELU for Qwen2-VL, RMSNorm +
    SwiGLU for Qwen2.5-VL, LayerNorm + exact GELU for Qwen-VL); the block structure is the same.
    """
    return make_transformer_config(
        dtype=dtype,
        execution=execution,
        tp=tp,
        pp=1,
        num_layers=cfg.depth,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_heads,
        kv_channels=cfg.hidden_size // cfg.num_heads,
        ffn_hidden_size=cfg.intermediate_size or int(cfg.hidden_size * cfg.mlp_ratio),
        normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=cfg.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=cfg.mlp == "swiglu",  # Qwen2.5-VL: SwiGLU with biases on gate/up/down
        activation_func={"swiglu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}.get(cfg.mlp, _quick_gelu()),
    )


def _quick_gelu():
    """megatron's QuickGELU, `torch.compile`d into one kernel on a GPU. On the CPU the compile buys
    nothing and costs every process 3 s (20 s with a cold inductor cache), so there it runs eagerly."""
    return quick_gelu if torch.cuda.is_available() else _eager_quick_gelu


def _eager_quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def vision_block(config, attention_backend: str, spec_backend: str) -> TransformerBlock:
    """The ViT's `depth` bidirectional pre-norm layers (no final norm: the projector normalises)."""
    return TransformerBlock(
        config=config,
        spec=layer_spec(causal=False, attention_backend=attention_backend, spec_backend=spec_backend),
        post_layer_norm=False,
        pre_process=True,
        post_process=True,
    )


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Segment boundaries of the ViT: one segment of h·w patches per temporal patch (int32)."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return torch.nn.functional.pad(per_frame.cumsum(0), (1, 0)).to(torch.int32)


class PatchEmbed(MegatronModule):
    """Conv3d(C → Hv, kernel = stride = (T, p, p), no bias) as a linear over flattened patches.

    `pixel_values` rows are already flattened over (C, T, p, p) in the Conv3d weight's order, so
    `weight [Hv, C·T·p·p]` = HF `proj.weight.reshape(Hv, -1)` and the result is bit-for-bit the
    same product. Replicated across TP ranks (it is small and its output feeds every rank).
    """

    def __init__(self, config, cfg: VisionConfig):
        super().__init__(config=config)
        in_features = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.proj = torch.nn.Linear(in_features, cfg.hidden_size, bias=False, dtype=config.params_dtype)

    def forward(self, pix_PD: torch.Tensor) -> torch.Tensor:
        return self.proj(pix_PD.to(self.proj.weight.dtype))


class Qwen2VisionTransformer(MegatronModule):
    """pixel_values `[P, C·T·p·p]`, grid_thw `[k, 3]` → patch features `[P, Hv]` (before merging)."""

    def __init__(
        self, cfg: VisionConfig, *, tp: int, dtype: torch.dtype, attention_backend: str = "auto", spec_backend: str = "local",
        execution: Execution = Execution(),
    ):
        config = vision_transformer_config(cfg, tp=tp, dtype=dtype, execution=execution)
        super().__init__(config=config)
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.patch_embed = PatchEmbed(config, cfg)
        self.decoder = vision_block(config, attention_backend, spec_backend)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        h_P1D = self.patch_embed(pixel_values).unsqueeze(1)
        rope = vision_rope_freqs(grid_thw, self.head_dim, self.cfg.spatial_merge_size).to(h_P1D.device)
        cu = frame_cu_seqlens(grid_thw).to(h_P1D.device)
        longest = int((cu[1:] - cu[:-1]).max())
        packed = PackedSeqParams(
            qkv_format="sbhd",  # per-token RoPE angles on the bshd path; cu_seqlens for VarlenAttention
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
        shards = SequenceShards(self.config, h_P1D.shape[0], fp8_row_multiple(self.config))  # parallel.sp: rows split over TP ranks
        h = self.decoder(
            hidden_states=shards.scatter(h_P1D), attention_mask=None, rotary_pos_emb=shards.pad_rows(rope), packed_seq_params=packed
        )
        return shards.gather(h).squeeze(1)
