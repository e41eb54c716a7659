"""A tiny Qwen2-VL config and a hand-built `PackedBatch`, for tests and smoke runs of the model.

Independent of `data_pipelines` beyond the `PackedBatch` dataclass: the token layout and the 3-D
positions are constructed here the way Qwen2-VL's `get_rope_index` defines them (text: t=h=w
running on; image tokens: t/h/w = start + grid index of the merged token; text after an image
continues at max + 1), restarting per sample.
"""

from __future__ import annotations

import torch

from data_pipelines.schema import IGNORE_INDEX, PackedBatch
from qvl_train.config import LLMConfig, ModelConfig, VisionConfig

__all__ = ["tiny_model_config", "tiny_qwen2_5_vl_config", "tiny_qwen3_vl_config", "tiny_qwen3_vl_moe_config", "packed_batch"]


def tiny_model_config(**overrides) -> ModelConfig:
    """ViT depth 2 / width 64 / 4 heads; LLM 2 layers / width 64 / 4 heads / 2 kv groups / ffn 128."""
    cfg = ModelConfig(
        generation="qwen2_vl",
        vision=VisionConfig(depth=2, hidden_size=64, num_heads=4, mlp_ratio=2.0),
        llm=LLMConfig(
            num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            vocab_size=151936, rope_theta=10000.0, mrope_section=[4, 2, 2],
        ),
        attention_backend="sdpa_loop",
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_qwen2_5_vl_config(**overrides) -> ModelConfig:
    """Tiny Qwen2.5-VL: ViT depth 4 (blocks 1 and 3 full attention, others 112-px windows), RMSNorm,
    SwiGLU width 96; the same tiny Qwen2 LLM as `tiny_model_config`."""
    cfg = tiny_model_config(generation="qwen2_5_vl")
    cfg.vision = VisionConfig(
        depth=4, hidden_size=64, num_heads=4, intermediate_size=96, norm="rmsnorm", mlp="swiglu",
        window_size=112, fullatt_block_indexes=[1, 3],
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_qwen3_vl_config(**overrides) -> ModelConfig:
    """Tiny Qwen3-VL: ViT depth 3 / width 64 (patch 16, 8×8 learned position table, tanh-GELU MLP
    96, DeepStack from blocks 0 and 1); Qwen3 LLM 3 layers / width 64 / 4 heads of 32 (head_dim ≠
    64 / 4) / 2 kv groups, q/k RMSNorm, no qkv bias, interleaved M-RoPE [6, 5, 5], tied embeddings."""
    cfg = tiny_model_config(generation="qwen3_vl")
    cfg.vision = VisionConfig(
        depth=3, hidden_size=64, num_heads=4, intermediate_size=96, norm="layernorm", mlp="gelu_tanh",
        patch_size=16, patch_bias=True, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
    )
    cfg.llm = LLMConfig(
        num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, head_dim=32,
        vocab_size=151936, rope_theta=5_000_000.0, mrope_section=[6, 5, 5], mrope_interleaved=True,
        qkv_bias=False, qk_norm=True, tie_word_embeddings=True,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_qwen3_vl_moe_config(**overrides) -> ModelConfig:
    """Tiny Qwen3-VL-MoE: the tiny Qwen3-VL with 2 LLM layers whose MLPs are 4 SwiGLU experts of width
    48, top-2 (width 64 ≠ 2·48, so the two HF expert layouts cannot be confused); untied embeddings
    (as the released MoE models). Same as configs/model/qwen3_vl_moe/tiny.yaml."""
    cfg = tiny_qwen3_vl_config(generation="qwen3_vl_moe")
    cfg.llm.num_layers = 2
    cfg.llm.tie_word_embeddings = False
    cfg.llm.num_experts, cfg.llm.moe_ffn_hidden_size, cfg.llm.moe_router_topk = 4, 48, 2
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _sample(n_before: int, grid: tuple[int, int, int] | None, n_after: int, merge: int, gen: torch.Generator, pad_id: int):
    """(input_ids, position_ids [3, n]) of one sample: text, optional image, text."""
    ids = [torch.randint(0, 151000, (n_before,), generator=gen)]
    pos = [torch.arange(n_before).expand(3, -1)]
    start = n_before
    if grid is not None:
        t, h, w = grid[0], grid[1] // merge, grid[2] // merge
        ids.append(torch.full((t * h * w,), pad_id))
        tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w).flatten()
        hh = torch.arange(h).view(1, -1, 1).expand(t, h, w).flatten()
        ww = torch.arange(w).view(1, 1, -1).expand(t, h, w).flatten()
        p = torch.stack([tt, hh, ww]) + start
        pos.append(p)
        start = int(p.max()) + 1
    ids.append(torch.randint(0, 151000, (n_after,), generator=gen))
    pos.append(torch.arange(n_after).expand(3, -1) + start)
    return torch.cat(ids), torch.cat(pos, dim=1)


def packed_batch(
    cfg: ModelConfig,
    grids: list[tuple[int, int, int] | None] = ((1, 4, 4), (1, 4, 6)),
    texts: list[tuple[int, int]] = ((5, 7), (3, 9)),
    pad: int = 5,
    seed: int = 0,
) -> PackedBatch:
    """Samples of (text, image, text) packed back to back, then `pad` padding slots.

    Labels are random token ids on every real token (so every position is checked) and -100 on
    padding; `pixel_values` are random with `T·h·w` rows per image.
    """
    gen = torch.Generator().manual_seed(seed)
    v = cfg.vision
    ids, pos, lens, pix, thw = [], [], [], [], []
    for grid, (nb, na) in zip(grids, texts):
        i, p = _sample(nb, grid, na, v.spatial_merge_size, gen, cfg.image_pad_id)
        ids.append(i)
        pos.append(p)
        lens.append(i.numel())
        if grid is not None:
            thw.append(grid)
            pix.append(torch.randn(grid[0] * grid[1] * grid[2], v.in_channels * v.temporal_patch_size * v.patch_size**2, generator=gen))
    n = sum(lens)
    input_ids = torch.cat(ids + [torch.zeros(pad, dtype=torch.long)])
    position_ids = torch.cat(pos + [torch.zeros(3, pad, dtype=torch.long)], dim=1)
    labels = torch.randint(0, 151000, (n + pad,), generator=gen)
    labels[n:] = IGNORE_INDEX
    labels[0] = IGNORE_INDEX  # one ignored real token, as a chat template's prompt would have
    cols = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        cu_seqlens=torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32),
        pixel_values=torch.cat(pix) if pix else torch.zeros(0, cols),
        grid_thw=torch.tensor(thw, dtype=torch.long).reshape(-1, 3),
        sample_ids=[f"s{i}" for i in range(len(lens))],
        num_tokens=n,
        num_label_tokens=int((labels != IGNORE_INDEX).sum()),
        num_visual_tokens=int((input_ids == cfg.image_pad_id).sum()),
    )
