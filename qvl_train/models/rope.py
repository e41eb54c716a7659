"""Rotary position embeddings of Qwen2-VL, as per-token frequency tensors for megatron.

megatron's `Attention.forward` applies `apply_rotary_pos_emb(t, freqs)` to q and k. On the "bshd"
path (no `cu_seqlens`) it takes `freqs` of shape `[s, 1, 1, head_dim]`, computes `cos(freqs)`,
`sin(freqs)` and rotates with the *rotate-half* (non-interleaved) convention,
`t * cos + rotate_half(t) * sin` — the same formula as HF's `apply_rotary_pos_emb`. So any RoPE
variant, however it assigns positions, is expressible as one angle per (token, channel): we build
`emb = cat(freqs, freqs)` per token, exactly as HF does before taking cos/sin, and hand it over.

Because the angles are per token, packing is free: positions restart per sample in the data
(`PackedBatch.position_ids`), and megatron must *not* restart them again (its "thd" path would
index frequencies by offset within each sample, wrong for M-RoPE). The model therefore passes
`PackedSeqParams(qkv_format="sbhd", ...)` (see `attention.py`).
"""

from __future__ import annotations

import torch

__all__ = ["inv_freq", "vision_rope_freqs", "mrope_freqs"]


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """1 / theta^(2i/dim), i < dim/2 (float32: HF computes the angles in fp32 too)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def vision_rope_freqs(grid_thw: torch.Tensor, head_dim: int, merge_size: int, theta: float = 10000.0) -> torch.Tensor:
    """2-D RoPE of the Qwen2-VL ViT: `[P, 1, 1, head_dim]` angles for the patches of `grid_thw`.

    Half of the rotary pairs encode the patch row, half the column (HF `VisionRotaryEmbedding` with
    dim = head_dim/2). Patch order matches `pixel_values` rows: (t, h-block, w-block, mh, mw), so the
    (h, w) ids are permuted the same way and repeated for every temporal patch.
    """
    freq = inv_freq(head_dim // 2, theta, device=grid_thw.device)  # [head_dim/4]
    pos = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).unsqueeze(1).expand(-1, w)
        wpos = torch.arange(w).unsqueeze(0).expand(h, -1)
        blocks = lambda p: p.reshape(h // merge_size, merge_size, w // merge_size, merge_size).permute(0, 2, 1, 3).flatten()  # noqa: E731
        pos.append(torch.stack([blocks(hpos), blocks(wpos)], dim=-1).repeat(t, 1))
    pos_P2 = torch.cat(pos).to(freq.device).float()
    freqs = (pos_P2[:, :, None] * freq[None, None, :]).flatten(1)  # [P, head_dim/2]: (h freqs, w freqs)
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


def mrope_freqs(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int], interleaved: bool = False
) -> torch.Tensor:
    """Multimodal RoPE of the Qwen2-VL LLM: `[L, 1, 1, head_dim]` angles from `position_ids [3, L]`.

    Rotary pair i takes its position from the temporal, height or width row according to
    `mrope_section` (e.g. [16, 24, 24] for head_dim 128: pairs 0-15 ← t, 16-39 ← h, 40-63 ← w);
    the same selection applies to both halves of `cat(freqs, freqs)` (HF
    `apply_multimodal_rotary_pos_emb` with `mrope_section * 2`).

    `interleaved` (Qwen3-VL, HF `apply_interleaved_mrope`): pair j takes h if j % 3 == 1 and
    j < 3·section[1], w if j % 3 == 2 and j < 3·section[2], else t (e.g. [24, 20, 20]: pairs
    t h w t h w … up to pair 59, then t for 60-63), so every axis spans low and high frequencies.
    """
    assert 2 * sum(mrope_section) == head_dim, (mrope_section, head_dim)
    freq = inv_freq(head_dim, theta, device=position_ids.device)  # [head_dim/2]
    freqs_3LD = position_ids.float()[:, :, None] * freq[None, None, :]
    if interleaved:
        j = torch.arange(head_dim // 2, device=position_ids.device)
        row = torch.zeros_like(j)
        row[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
        row[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    else:
        row = torch.repeat_interleave(torch.arange(3, device=position_ids.device), torch.tensor(mrope_section, device=position_ids.device))
    freqs = freqs_3LD.gather(0, row[None, None, :].expand(1, freqs_3LD.shape[1], -1)).squeeze(0)  # [L, head_dim/2]
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
