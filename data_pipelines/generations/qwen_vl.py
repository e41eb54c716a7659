"""Qwen-VL (v1): a fixed 448² input, 256 resampler queries per image, `<img>`/`<imgpad>`/`</img>`,
1-D RoPE (every row of the position ids is the token index), `<ref>`/`<box>` grounding, no video."""

from __future__ import annotations

from data_pipelines.generations.base import DataSpec
from data_pipelines.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, QWEN_VL_PATCH, VisionSpec


def special_tokens() -> dict:
    """The released `tokenization_qwen.py`: 3 ChatML tokens, 205 `<|extra_i|>`, then `<ref>` … `<imgpad>`."""
    from data_pipelines.text import QWEN_VL_SPECIAL_TOKENS, SPECIAL_TOKENS

    chatml = {n: SPECIAL_TOKENS[n] for n in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    extras = {f"<|extra_{i}|>": SPECIAL_TOKENS["<|im_end|>"] + 1 + i for i in range(205)}
    return {**chatml, **extras, **QWEN_VL_SPECIAL_TOKENS}


def positions(input_ids, image_grid_thw=(), video_grid_thw=(), merge_size=1, video_second_per_grid=None,
              tokens_per_second=2):
    from data_pipelines.positions import sequential_position_ids

    return sequential_position_ids(input_ids)


def fixed_image(img, as_codes: bool):
    from data_pipelines.vision import preprocess_qwen_vl, qwen_vl_codes

    return qwen_vl_codes(img) if as_codes else preprocess_qwen_vl(img)


def fixed_image_lut():
    from data_pipelines.vision import qwen_vl_lut

    return qwen_vl_lut()


SPEC = DataSpec(
    name="qwen_vl",
    special_tokens=special_tokens,
    image=VisionSpec(QWEN_VL_PATCH, 1, 1, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 448 * 448, 448 * 448),
    positions=positions,
    grounding="qwen_vl_tags",
    default_system=True,
    think_tokens=False,
    image_tokens=("<img>", "<imgpad>", "</img>"),
    video=None,
    fixed_image=fixed_image,
    fixed_image_lut=fixed_image_lut,
    fixed_image_tokens=256,
)
