"""HF `Qwen2VLForConditionalGeneration` weights → this package's `VLM` state dict (full, tp = pp = 1).

The result is the unsharded state dict of a tp=1, pp=1 `VLM` (keys as `model.state_dict()`), so
`model.load_state_dict(out, strict=False)` loads it (only megatron's `_extra_state` entries are
absent). Other layouts: load it at tp=1/pp=1 and save with `dist_checkpointing`, which reshards.

Layout changes that are more than a rename:
* attention `linear_qkv` is fused and grouped per query group (megatron's layout): for each of
  the `ng` kv groups, the rows of its `nh/ng` query heads, then its k head, then its v head. HF has
  separate q/k/v projections (LLM) or one `[q; k; v]` matrix (ViT, where ng = nh).
* SwiGLU `linear_fc1` = `[gate; up]` stacked on the output dim.
* the Conv3d patch embedding `[Hv, C, T, p, p]` is a linear `[Hv, C·T·p·p]` (same element order).

Both key spellings are read: transformers ≥ 4.52 (`model.visual.*`, `model.language_model.*`,
`lm_head.*`) and the released hub checkpoints (`visual.*`, `model.layers.*`, `model.embed_tokens.*`).
"""

from __future__ import annotations

import re

import torch

from qvl_train.config import ModelConfig

__all__ = ["hf_to_ours", "fuse_qkv"]


def _normalise(key: str) -> str:
    """Map both HF spellings onto `visual.*` / `lm.*` / `lm_head.*`."""
    for old, new in (("model.visual.", "visual."), ("model.language_model.", "lm."), ("model.", "lm.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Separate q `[nh·d, …]`, k/v `[ng·d, …]` → megatron's grouped `[ng·(nh/ng + 2)·d, …]`."""
    d = q.shape[0] // num_heads
    rest = q.shape[1:]
    qg = q.reshape(num_groups, (num_heads // num_groups) * d, *rest)
    kg = k.reshape(num_groups, d, *rest)
    vg = v.reshape(num_groups, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest).contiguous()


def hf_to_ours(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Convert an HF Qwen2-VL state dict to the full state dict of our `VLM` (see module docstring)."""
    if cfg.generation != "qwen2_vl":
        raise ValueError(f"hf_to_ours converts qwen2_vl checkpoints, not {cfg.generation!r}")
    src = {_normalise(k): v for k, v in hf_state_dict.items()}
    vit, llm = cfg.vision, cfg.llm
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return src[key]

    # ---- vision tower
    out["vision.patch_embed.proj.weight"] = take("visual.patch_embed.proj.weight").reshape(vit.hidden_size, -1)
    for i in range(vit.depth):
        s, d = f"visual.blocks.{i}.", f"vision.decoder.layers.{i}."
        for part in ("weight", "bias"):
            out[d + f"input_layernorm.{part}"] = take(s + f"norm1.{part}")
            out[d + f"pre_mlp_layernorm.{part}"] = take(s + f"norm2.{part}")
            q, k, v = take(s + f"attn.qkv.{part}").chunk(3, dim=0)
            out[d + f"self_attention.linear_qkv.{part}"] = fuse_qkv(q, k, v, vit.num_heads, vit.num_heads)
            out[d + f"self_attention.linear_proj.{part}"] = take(s + f"attn.proj.{part}")
            out[d + f"mlp.linear_fc1.{part}"] = take(s + f"mlp.fc1.{part}")
            out[d + f"mlp.linear_fc2.{part}"] = take(s + f"mlp.fc2.{part}")
    # ---- merger
    for part in ("weight", "bias"):
        out[f"projector.ln_q.{part}"] = take(f"visual.merger.ln_q.{part}")
        out[f"projector.linear_fc1.{part}"] = take(f"visual.merger.mlp.0.{part}")
        out[f"projector.linear_fc2.{part}"] = take(f"visual.merger.mlp.2.{part}")
    # ---- language model
    out["llm.embedding.weight"] = take("lm.embed_tokens.weight")
    for i in range(llm.num_layers):
        s, d = f"lm.layers.{i}.", f"llm.decoder.layers.{i}."
        out[d + "input_layernorm.weight"] = take(s + "input_layernorm.weight")
        out[d + "pre_mlp_layernorm.weight"] = take(s + "post_attention_layernorm.weight")
        parts = ("weight", "bias") if llm.qkv_bias else ("weight",)
        for part in parts:
            q, k, v = (take(s + f"self_attn.{n}_proj.{part}") for n in "qkv")
            out[d + f"self_attention.linear_qkv.{part}"] = fuse_qkv(q, k, v, llm.num_attention_heads, llm.num_query_groups)
        out[d + "self_attention.linear_proj.weight"] = take(s + "self_attn.o_proj.weight")
        out[d + "mlp.linear_fc1.weight"] = torch.cat([take(s + "mlp.gate_proj.weight"), take(s + "mlp.up_proj.weight")])
        out[d + "mlp.linear_fc2.weight"] = take(s + "mlp.down_proj.weight")
    out["llm.decoder.final_layernorm.weight"] = take("lm.norm.weight")
    if not llm.tie_word_embeddings:
        out["llm.output_layer.weight"] = take("lm_head.weight")
    else:
        used.add("lm_head.weight")
    unused = [k for k in src if k not in used and not re.search(r"rotary_emb|inv_freq", k)]
    if unused:
        raise ValueError(f"hf_to_ours: HF tensors not mapped (config mismatch?): {unused[:8]}")
    return {k: v.contiguous() for k, v in out.items()}
