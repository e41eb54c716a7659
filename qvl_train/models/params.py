"""Analytic parameter counts of a `ModelConfig` (no model is built): for size checks and MFU.

Counts are those of the HF checkpoint (= ours: the conversion is a bijection of tensors); tied
embeddings are counted once, as the safetensors totals on the model pages do.
"""

from __future__ import annotations

from qvl_train import generations
from qvl_train.config import ModelConfig

__all__ = ["count_parameters"]


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """`{"vision", "projector", "llm", "total", "active"}` parameter counts of the model `cfg` describes
    (`active`: what one token passes through; = `total` for dense models)."""
    v, l = cfg.vision, cfg.llm
    hv = v.hidden_size
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2 * hv + (hv if v.patch_bias else 0)
    patch += (v.num_position_embeddings or 0) * hv  # Qwen3-VL learned position table
    norm = hv if v.norm == "rmsnorm" else 2 * hv
    attn = hv * 3 * hv + 3 * hv + hv * hv + hv
    inner = v.intermediate_size or int(hv * v.mlp_ratio)
    if v.mlp == "swiglu":
        mlp = 2 * (hv * inner + inner) + inner * hv + hv
    else:
        mlp = hv * inner + inner + inner * hv + hv
    vision = patch + v.depth * (2 * norm + attn + mlp)
    width = hv * v.spatial_merge_size**2
    projector = norm + width * width + width + width * l.hidden_size + l.hidden_size
    if generations.get(cfg.generation).projector == "resampler":  # Qwen-VL: + ln_pre; the resampler, no merger
        vision += 2 * hv
        projector = _qwen_vl_resampler(v.num_queries, hv, l.hidden_size)
    # Qwen3-VL DeepStack mergers: the same MLP with a LayerNorm over the joined width
    projector += len(v.deepstack_visual_indexes) * (2 * width + width * width + width + width * l.hidden_size + l.hidden_size)

    h = l.hidden_size
    d = l.head_dim or h // l.num_attention_heads
    kv = l.num_query_groups * d
    q = l.num_attention_heads * d
    attn_l = h * q + 2 * h * kv + (q + 2 * kv if l.qkv_bias else 0) + q * h + (2 * d if l.qk_norm else 0)
    if l.num_experts:  # router + routed SwiGLU experts (Qwen3 MoE has no shared expert)
        mlp_l = h * l.num_experts + l.num_experts * 3 * h * l.moe_ffn_hidden_size
        active_mlp_l = h * l.num_experts + l.moe_router_topk * 3 * h * l.moe_ffn_hidden_size
    else:
        mlp_l = active_mlp_l = 3 * h * l.ffn_hidden_size
    layer = attn_l + mlp_l + 2 * h
    embed = l.vocab_size * h
    outside = embed + h + (0 if l.tie_word_embeddings else embed)
    llm = outside + l.num_layers * layer
    active = vision + projector + outside + l.num_layers * (attn_l + active_mlp_l + 2 * h)
    return {"vision": vision, "projector": projector, "llm": llm, "total": vision + projector + llm, "active": active}


def _qwen_vl_resampler(queries: int, hv: int, h: int) -> int:
    """query + sin-cos table, kv_proj (no bias), packed in_proj + out_proj with biases, ln_q/ln_kv/ln_post, proj."""
    return 2 * queries * h + hv * h + (3 * h * h + 3 * h) + (h * h + h) + 3 * 2 * h + h * h
