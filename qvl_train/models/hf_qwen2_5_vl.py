"""HF `Qwen2_5_VLForConditionalGeneration` weights ⇄ this package's `VLM` state dict (tp = pp = 1).

Qwen2.5-VL differs from Qwen2-VL in the vision blocks only: RMSNorm `norm1`/`norm2` (no bias),
SwiGLU `mlp.gate_proj/up_proj/down_proj` with biases (ours: `linear_fc1 = [gate; up]`), RMSNorm
merger `ln_q`. The rule table lives in `hf_convert.py` (shared with Qwen2-VL, both directions).
"""

from __future__ import annotations

import torch

from qvl_train.config import ModelConfig
from qvl_train.models import hf_convert

__all__ = ["hf_to_ours", "ours_to_hf"]


def hf_to_ours(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Qwen2.5-VL state dict (hub or runtime key spelling) → full state dict of our `VLM`."""
    if cfg.generation != "qwen2_5_vl":
        raise ValueError(f"hf_qwen2_5_vl.hf_to_ours converts qwen2_5_vl checkpoints, not {cfg.generation!r}")
    return hf_convert.hf_to_ours(hf_state_dict, cfg)


def ours_to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, *, style: str = "hub", write_tied_lm_head: bool = False):
    """Full state dict of our Qwen2.5-VL `VLM` → HF state dict (`style`: hub | runtime key names)."""
    if cfg.generation != "qwen2_5_vl":
        raise ValueError(f"hf_qwen2_5_vl.ours_to_hf converts qwen2_5_vl models, not {cfg.generation!r}")
    return hf_convert.ours_to_hf(state_dict, cfg, style=style, write_tied_lm_head=write_tied_lm_head)
