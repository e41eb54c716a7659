"""Qwen-VL (v1): the OpenCLIP ViT-bigG-style encoder on megatron blocks and the cross-attention resampler.

Architecture (Qwen-VL paper, arXiv:2308.12966, and the public `visual.py` of Qwen/Qwen-VL):

* ViT at a fixed `image_size` (448): Conv2d patch embedding without bias (here a linear over the
  C·p·p values of each patch: `pixel_values` rows are the 32×32 patches in row-major order,
  columns (C, ph, pw)), plus a learned absolute position table of `num_position_embeddings` rows
  (16×16) bicubically interpolated to the patch grid (`F.interpolate(..., "bicubic",
  align_corners=False)`, as the original `get_abs_pos`), `ln_pre`, then `depth` pre-LayerNorm blocks
  (qkv and MLP with biases, exact GELU, no RoPE) attending over all patches of one image.
  No final norm in the tower: the resampler normalises its keys/values itself.
* Resampler (`QwenVLResampler`, the projector of this generation): `num_queries` (256) learnable
  queries attend once, with `resampler_heads` heads (LLM width / 128), to the patch features of
  each image, projected to the LLM width (`kv_proj`, no bias) and LayerNorm-ed (`ln_kv`). Fixed 2-D
  sin-cos position embeddings are added to the queries (16×16 table) and to the keys (the same
  table bicubically interpolated to the 32×32 patch grid); values get none. Then `ln_post` and a
  bias-free `proj` matrix (`x @ proj`). The sin-cos table is a parameter as in the released
  checkpoint (its init is the sin-cos formula, `reset_fixed_parameters`).

The resampler is plain PyTorch (one small layer): under tensor parallelism it is replicated on the
TP ranks of a group, which see the same ViT output, so their gradients agree without communication.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from qvl_train.config import ModelConfig, ParallelConfig, VisionConfig
from qvl_train.models.common import Execution, SequenceShards
from qvl_train.models.fp8 import fp8_row_multiple
from qvl_train.models.vision.qwen2_vl import vision_block, vision_transformer_config
from qvl_train.models.vlm import VLM

__all__ = [
    "QwenVLVisionTransformer", "QwenVLResampler", "QwenVLM", "sincos_2d", "interpolate_abs_pos",
]



def interpolate_abs_pos(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """`[S², D]` position table → `[tokens, D]` on a √tokens square grid (bicubic, fp32; identity if equal)."""
    src, dst = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if src == dst:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """MAE-style 2-D sin-cos table `[side², dim]` (float32): the first dim/2 channels encode the
    column (w) index, the last dim/2 the row (h) index, each as [sin | cos] of pos·10000^(-2i/(dim/2)).
    Computed in float64 and rounded once, so it is the same on every machine."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")

    def one(pos: torch.Tensor) -> torch.Tensor:
        ang = pos.reshape(-1, 1) * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


class QwenVLVisionTransformer(MegatronModule):
    """pixel_values `[P, C·p·p]` (1024 rows per 448² image), grid_thw `[k, 3]` → patch features `[P, Hv]`."""

    def __init__(
        self, cfg: VisionConfig, *, tp: int, dtype: torch.dtype, attention_backend: str = "auto", spec_backend: str = "local",
        execution: Execution = Execution(),
    ):
        config = vision_transformer_config(cfg, tp=tp, dtype=dtype, execution=execution)  # LayerNorm, exact GELU
        super().__init__(config=config)
        self.cfg = cfg
        self.patch_embed = torch.nn.Linear(cfg.in_channels * cfg.patch_size**2, cfg.hidden_size, bias=False, dtype=dtype)
        self.positional_embedding = torch.nn.Parameter(torch.empty(cfg.num_position_embeddings, cfg.hidden_size, dtype=dtype))
        self.ln_pre = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        self.decoder = vision_block(config, attention_backend, spec_backend)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        side = self.cfg.image_size // self.cfg.patch_size
        if grid_thw.numel() and not bool((grid_thw == torch.tensor([1, side, side], device=grid_thw.device)).all()):
            raise ValueError(f"Qwen-VL takes {self.cfg.image_size}² images ({side}×{side} patches); got grid_thw={grid_thw.tolist()}")
        n, per = grid_thw.shape[0], side * side
        h_PD = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        pos = interpolate_abs_pos(self.positional_embedding, per)
        h_PD = self.ln_pre((h_PD.view(n, per, -1) + pos).view(n * per, -1))
        cu = torch.arange(0, (n + 1) * per, per, dtype=torch.int32, device=h_PD.device)  # one segment per image
        packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=per, max_seqlen_kv=per)
        shards = SequenceShards(self.config, h_PD.shape[0], fp8_row_multiple(self.config))  # parallel.sp: rows split over TP ranks
        h = self.decoder(
            hidden_states=shards.scatter(h_PD.unsqueeze(1)), attention_mask=None, rotary_pos_emb=None, packed_seq_params=packed
        )
        return shards.gather(h).squeeze(1)


class _CrossAttention(torch.nn.Module):
    """Multi-head attention with packed `in_proj` `[3H, H]` = [W_q; W_k; W_v] (torch `nn.MultiheadAttention`'s layout)."""

    def __init__(self, width: int, heads: int, dtype: torch.dtype):
        super().__init__()
        self.heads = heads
        self.in_proj = torch.nn.Linear(width, 3 * width, dtype=dtype)
        self.out_proj = torch.nn.Linear(width, width, dtype=dtype)

    def forward(self, q_QH: torch.Tensor, k_NSH: torch.Tensor, v_NSH: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj.weight.chunk(3)
        bq, bk, bv = self.in_proj.bias.chunk(3)
        n, s, width = k_NSH.shape
        d = width // self.heads
        q = F.linear(q_QH, wq, bq).view(1, -1, self.heads, d).transpose(1, 2)  # [1, h, Q, d]
        k = F.linear(k_NSH, wk, bk).view(n, s, self.heads, d).transpose(1, 2)  # [n, h, S, d]
        v = F.linear(v_NSH, wv, bv).view(n, s, self.heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.expand(n, -1, -1, -1), k, v)  # [n, h, Q, d]
        return self.out_proj(o.transpose(1, 2).reshape(n, -1, width))


class QwenVLResampler(MegatronModule):
    """Patch features `[k·S, Hv]` of k images → `[k·num_queries, H_llm]` LLM embeddings."""

    def __init__(self, config, cfg: VisionConfig, llm_hidden_size: int):
        super().__init__(config=config)
        dtype, width = config.params_dtype, llm_hidden_size
        self.side = math.isqrt(cfg.num_queries)
        self.per_image = (cfg.image_size // cfg.patch_size) ** 2
        self.query = torch.nn.Parameter(torch.empty(cfg.num_queries, width, dtype=dtype))
        self.pos_embed = torch.nn.Parameter(torch.empty(cfg.num_queries, width, dtype=dtype))
        # The released code uses an identity instead when the widths agree; Qwen-VL's differ (1664 → 4096).
        self.kv_proj = torch.nn.Linear(cfg.hidden_size, width, bias=False, dtype=dtype)
        self.attn = _CrossAttention(width, cfg.resampler_heads or width // 128, dtype)
        self.ln_q = torch.nn.LayerNorm(width, eps=cfg.norm_eps, dtype=dtype)
        self.ln_kv = torch.nn.LayerNorm(width, eps=cfg.norm_eps, dtype=dtype)
        self.ln_post = torch.nn.LayerNorm(width, eps=cfg.norm_eps, dtype=dtype)
        self.proj = torch.nn.Parameter(torch.empty(width, width, dtype=dtype))

    @torch.no_grad()
    def reset_fixed_parameters(self) -> None:
        """The sin-cos table (`init_weights` calls this after its generic init)."""
        self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[1], self.side))

    def forward(self, x_PD: torch.Tensor) -> torch.Tensor:
        per = self.per_image
        x = x_PD.view(-1, per, x_PD.shape[-1])
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query) + self.pos_embed
        out = self.attn(q, kv + interpolate_abs_pos(self.pos_embed, per), kv)
        return (self.ln_post(out) @ self.proj).reshape(-1, out.shape[-1])


class QwenVLM(VLM):
    """Qwen-VL: the ViT above, the resampler as projector, Qwen-7B as LLM (1-D RoPE: the data side
    gives three equal position rows, so any `mrope_section` is plain RoPE); visual embeddings go to
    the `<imgpad>` positions between `<img>` and `</img>`."""

    def __init__(
        self, cfg: ModelConfig, parallel: ParallelConfig, *, pre_process: bool, post_process: bool, dtype=torch.float32,
        spec_backend: str = "local", execution: Execution = Execution(), vp_stage=None,
    ):
        super().__init__(
            cfg, parallel, pre_process=pre_process, post_process=post_process, dtype=dtype, spec_backend=spec_backend,
            vision_cls=QwenVLVisionTransformer, projector_cls=QwenVLResampler, execution=execution, vp_stage=vp_stage,
        )

    def embed(self, batch) -> torch.Tensor:
        h_L1H = self.llm.embed(batch.input_ids)
        if batch.pixel_values.numel() == 0:
            return h_L1H
        vis_VH = self.encode_media(batch, lambda pix, grid: self.projector(self.vision(pix, grid)))
        pos = self.media_positions(batch.input_ids)  # `<imgpad>`: model.image_token_id
        if pos.numel() != vis_VH.shape[0]:
            raise ValueError(
                f"{pos.numel()} <imgpad> tokens but {vis_VH.shape[0]} visual embeddings "
                f"({batch.grid_thw.shape[0]} images × {self.cfg.vision.num_queries}): the text and the pixels do not match"
            )
        return h_L1H.squeeze(1).index_put((pos,), vis_VH.to(h_L1H.dtype)).unsqueeze(1)
