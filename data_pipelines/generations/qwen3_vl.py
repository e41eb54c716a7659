"""Qwen3-VL (dense and MoE: one data spec): patch 16, mean = std = 0.5, no default system turn,
`<think>` / `</think>` as added tokens, JSON grounding on [0, 1000], video frames announced by
`<t seconds>` text (each temporal patch its own start/pads/end run; its position ids restart the
temporal axis per frame)."""

from __future__ import annotations

from dataclasses import replace

from data_pipelines.generations.base import DataSpec, VideoRules
from data_pipelines.vision import VisionSpec


def special_tokens() -> dict:
    """Qwen2-VL's specials plus the Qwen3 tokenizer's added tokens (`<tool_call>` … `</think>`, 151657–151668)."""
    from data_pipelines.text import QWEN3_SPECIAL_TOKENS, SPECIAL_TOKENS

    return {**SPECIAL_TOKENS, **QWEN3_SPECIAL_TOKENS}


def positions(input_ids, image_grid_thw=(), video_grid_thw=(), merge_size=2, video_second_per_grid=None,
              tokens_per_second=2):
    from data_pipelines.positions import qwen3_vl_position_ids

    return qwen3_vl_position_ids(input_ids, image_grid_thw, video_grid_thw, merge_size)


SPEC = DataSpec(
    name="qwen3_vl",
    special_tokens=special_tokens,
    image=VisionSpec(16, 2, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 65536, 16777216),
    positions=positions,
    grounding="json_relative",
    default_system=False,
    think_tokens=True,
    video=VideoRules(timestamps=True, pixels=(128 * 32 * 32, 32 * 32 * 768)),
)
MOE_SPEC = replace(SPEC, name="qwen3_vl_moe", count_key="qwen3_vl")
"""Qwen3-VL-MoE: the same data; only the LLM differs."""
