"""The Qwen3-VL vision transformer (HF `Qwen3VLVisionModel`, transformers 4.57) on megatron blocks.

patch embed (Conv3d with bias over C·T·16·16, written as a linear) + a learned absolute position
embedding (`num_position_embeddings` = S² rows on an S×S grid) bilinearly interpolated to each
image's patch grid → `depth` pre-LayerNorm blocks (qkv bias, fc1 → tanh-GELU → fc2 with biases,
the same 2-D RoPE as Qwen2-VL) attending within each frame. The tower returns the last block's
patch features and those of the `deepstack_visual_indexes` blocks (DeepStack); the mergers live in
the projector (`projector.DeepStackProjector`).

Position embedding interpolation (HF `fast_pos_embed_interpolate`): for a grid of h × w patches the
sample points are `linspace(0, S-1, h)` × `linspace(0, S-1, w)`; each takes the four neighbours
(floor / floor+1 clipped at S-1) with weights (1-dh)(1-dw), (1-dh)dw, dh(1-dw), dh·dw, computed in
float32 exactly as HF does, summed in HF's order; repeated for every temporal patch and permuted to
the (t, h-block, w-block, mh, mw) row order of `pixel_values`.

Blocks run one by one (as in the Qwen2.5-VL tower) to pick up the DeepStack features; the
`TransformerBlock` still owns the layers, so names and sharding are megatron's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from qvl_train.config import VisionConfig
from qvl_train.models.common import Execution, SequenceShards, make_transformer_config, run_layer
from qvl_train.models.fp8 import fp8_row_multiple
from qvl_train.models.rope import vision_rope_freqs
from qvl_train.models.specs import layer_spec
from qvl_train.models.vision.qwen2_vl import frame_cu_seqlens

__all__ = ["Qwen3VisionTransformer", "qwen3_vision_transformer_config", "interpolated_pos_index"]


def qwen3_vision_transformer_config(cfg: VisionConfig, *, tp: int, dtype: torch.dtype, execution: Execution = Execution()):
    """LayerNorm, non-gated MLP (`intermediate_size`) with tanh-GELU, biases everywhere, pp = 1."""
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
        normalization="LayerNorm",
        layernorm_epsilon=cfg.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=functools.partial(F.gelu, approximate="tanh"),  # HF gelu_pytorch_tanh
    )


def interpolated_pos_index(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour rows `[4, P]` (long) and weights `[4, P]` (float32) of the bilinear interpolation of an
    S×S (`side`) position table to every patch of `grid_thw`, in `pixel_values` row order."""
    idx_out, w_out = [], []
    for t, h, w in grid_thw.tolist():
        h_idx = torch.linspace(0, side - 1, h)
        w_idx = torch.linspace(0, side - 1, w)
        hf, wf = h_idx.int(), w_idx.int()
        hc, wc = (hf + 1).clip(max=side - 1), (wf + 1).clip(max=side - 1)
        dh, dw = h_idx - hf, w_idx - wf
        bh, bhc = hf * side, hc * side
        idx = torch.stack([
            (bh[:, None] + wf[None]).flatten(), (bh[:, None] + wc[None]).flatten(),
            (bhc[:, None] + wf[None]).flatten(), (bhc[:, None] + wc[None]).flatten(),
        ]).long()
        wts = torch.stack([
            ((1 - dh)[:, None] * (1 - dw)[None]).flatten(), ((1 - dh)[:, None] * dw[None]).flatten(),
            (dh[:, None] * (1 - dw)[None]).flatten(), (dh[:, None] * dw[None]).flatten(),
        ])
        order = (
            torch.arange(h * w).reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten().repeat(t)
        )
        idx_out.append(idx[:, order])
        w_out.append(wts[:, order])
    return torch.cat(idx_out, dim=1), torch.cat(w_out, dim=1)


class Qwen3PatchEmbed(MegatronModule):
    """Conv3d(C → Hv, kernel = stride = (T, p, p), with bias) as a linear over flattened patches."""

    def __init__(self, config, cfg: VisionConfig):
        super().__init__(config=config)
        in_features = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.proj = torch.nn.Linear(in_features, cfg.hidden_size, bias=cfg.patch_bias, dtype=config.params_dtype)

    def forward(self, pix_PD: torch.Tensor) -> torch.Tensor:
        return self.proj(pix_PD.to(self.proj.weight.dtype))


class Qwen3VisionTransformer(MegatronModule):
    """pixel_values `[P, C·T·p·p]`, grid_thw `[k, 3]` → (features `[P, Hv]`, DeepStack features `[P, Hv]` each)."""

    returns_deepstack = True

    def __init__(
        self, cfg: VisionConfig, *, tp: int, dtype: torch.dtype, attention_backend: str = "auto", spec_backend: str = "local",
        execution: Execution = Execution(),
    ):
        if not cfg.num_position_embeddings:
            raise ValueError("Qwen3-VL's ViT needs model.vision.num_position_embeddings (2304 for the released models)")
        config = qwen3_vision_transformer_config(cfg, tp=tp, dtype=dtype, execution=execution)
        super().__init__(config=config)
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.side = int(cfg.num_position_embeddings**0.5)
        if self.side * self.side != cfg.num_position_embeddings:
            raise ValueError(f"model.vision.num_position_embeddings={cfg.num_position_embeddings} is not a square")
        self.patch_embed = Qwen3PatchEmbed(config, cfg)
        self.pos_embed = torch.nn.Parameter(torch.empty(cfg.num_position_embeddings, cfg.hidden_size, dtype=dtype))
        self.decoder = TransformerBlock(
            config=config,
            spec=layer_spec(causal=False, attention_backend=attention_backend, spec_backend=spec_backend),
            post_layer_norm=False,
            pre_process=True,
            post_process=True,
        )
        self.deepstack_indexes = list(cfg.deepstack_visual_indexes)

    def position_embedding(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """`[P, Hv]` interpolated absolute position embedding, `pixel_values` row order."""
        idx, wts = interpolated_pos_index(grid_thw.cpu(), self.side, self.cfg.spatial_merge_size)
        e = self.pos_embed[idx.to(self.pos_embed.device)] * wts.to(self.pos_embed)[:, :, None]
        return e[0] + e[1] + e[2] + e[3]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        h_PD = self.patch_embed(pixel_values)
        h_PD = h_PD + self.position_embedding(grid_thw)
        rope = vision_rope_freqs(grid_thw, self.head_dim, self.cfg.spatial_merge_size).to(h_PD.device)
        cu = frame_cu_seqlens(grid_thw).to(h_PD.device)
        longest = int((cu[1:] - cu[:-1]).max())
        packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
        shards = SequenceShards(self.config, h_PD.shape[0], fp8_row_multiple(self.config))  # parallel.sp: rows split over TP ranks
        h, rope = shards.scatter(h_PD.unsqueeze(1)), shards.pad_rows(rope)
        deep = []
        for i, layer in enumerate(self.decoder.layers):
            h = run_layer(layer, h, rope, packed)
            if i in self.deepstack_indexes:
                deep.append(shards.gather(h).squeeze(1))
        return shards.gather(h).squeeze(1), deep  # in block order = config order (validated increasing)
