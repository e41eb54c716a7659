"""HF `Qwen3VLForConditionalGeneration` weights ⇄ this package's `VLM` state dict (tp = pp = 1).

Qwen3-VL differs from Qwen2/2.5-VL in: a patch-embedding bias and a learned `pos_embed` table
(ours: `vision.pos_embed`, a plain `[S², Hv]` parameter); ViT MLP `linear_fc1/linear_fc2`; the merger's
`norm` (ours `ln_q`) and `linear_fc1/linear_fc2` (not `mlp.0/mlp.2`); the DeepStack mergers
`deepstack_merger_list.{j}` (ours `projector.deepstack.{j}`); and the Qwen3 LLM without qkv bias but with
per-head `q_norm`/`k_norm` (ours `self_attention.q_layernorm/k_layernorm`). The rule table lives in
`hf_convert.py` (`_rules_qwen3_vl`, both directions; released checkpoints use the `model.visual.*` /
`model.language_model.*` spelling, which `detect_style` reports as ``runtime``).
"""

from __future__ import annotations

import torch

from qvl_train.config import ModelConfig
from qvl_train.models import hf_convert

__all__ = ["hf_to_ours", "ours_to_hf"]


def hf_to_ours(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Qwen3-VL state dict (either key spelling) → full state dict of our `VLM`."""
    if cfg.generation != "qwen3_vl":
        raise ValueError(f"hf_qwen3_vl.hf_to_ours converts qwen3_vl checkpoints, not {cfg.generation!r}")
    return hf_convert.hf_to_ours(hf_state_dict, cfg)


def ours_to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, *, style: str = "runtime", write_tied_lm_head: bool = False):
    """Full state dict of our Qwen3-VL `VLM` → HF state dict (`style`: runtime (as released) | hub)."""
    if cfg.generation != "qwen3_vl":
        raise ValueError(f"hf_qwen3_vl.ours_to_hf converts qwen3_vl models, not {cfg.generation!r}")
    return hf_convert.ours_to_hf(state_dict, cfg, style=style, write_tied_lm_head=write_tied_lm_head)
