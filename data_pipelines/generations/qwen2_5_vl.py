"""Qwen2.5-VL: Qwen2-VL's preprocessing and template; absolute-time M-RoPE for video (temporal ids
advance `second_per_grid · tokens_per_second` per temporal patch); JSON grounding in pixels of the
resized image."""

from __future__ import annotations

from data_pipelines.generations.base import DataSpec
from data_pipelines.generations.qwen2_vl import IMAGE, VIDEO, special_tokens


def positions(input_ids, image_grid_thw=(), video_grid_thw=(), merge_size=2, video_second_per_grid=None,
              tokens_per_second=2):
    from data_pipelines.positions import _rows, mrope_position_ids

    spg = [1.0] * len(_rows(video_grid_thw)) if video_second_per_grid is None else video_second_per_grid
    return mrope_position_ids(input_ids, image_grid_thw, video_grid_thw, merge_size,
                              video_second_per_grid=spg, tokens_per_second=tokens_per_second)


SPEC = DataSpec(
    name="qwen2_5_vl", special_tokens=special_tokens, image=IMAGE, positions=positions, grounding="json_absolute", default_system=True,
    think_tokens=False, video=VIDEO, video_absolute_time=True,
)
