"""Qwen2-VL: dynamic resolution (patch 14, 2×2 merge, OpenAI CLIP mean/std), ChatML with a default
system turn, M-RoPE over t/h/w, `<|object_ref_start|>…<|box_end|>` grounding on [0, 1000), video as
one run of `<|video_pad|>`s."""

from __future__ import annotations

from data_pipelines.generations.base import DataSpec, VideoRules
from data_pipelines.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionSpec

IMAGE = VisionSpec(14, 2, 2, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 56 * 56, 28 * 28 * 1280)
"""transformers 4.57.6 `Qwen2VLImageProcessor` defaults (the released preprocessor_config.json allows up
to 12,845,056 pixels: pass `max_pixels` to use that)."""
VIDEO = VideoRules(timestamps=False, pixels=(128 * 28 * 28, 28 * 28 * 768))


def special_tokens() -> dict:
    """Qwen2-VL's tokenizer: `<|endoftext|>` … `<|video_pad|>` (151643–151656)."""
    from data_pipelines.text import SPECIAL_TOKENS

    return dict(SPECIAL_TOKENS)


def positions(input_ids, image_grid_thw=(), video_grid_thw=(), merge_size=2, video_second_per_grid=None,
              tokens_per_second=2):
    from data_pipelines.positions import mrope_position_ids

    return mrope_position_ids(input_ids, image_grid_thw, video_grid_thw, merge_size)


SPEC = DataSpec(
    name="qwen2_vl", special_tokens=special_tokens, image=IMAGE, positions=positions, grounding="special_tokens", default_system=True,
    think_tokens=False, video=VIDEO,
)
