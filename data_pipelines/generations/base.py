"""`DataSpec`: everything the data side needs to know about one model generation.

A generation's data rules are values here, not `if generation == ...` branches in the pipeline: the
chat template's choices (default system turn, `<think>` as added tokens), the token strings that wrap
an image or a video (their ids come from the tokenizer: `QwenTokenizer.special`), image preprocessing
(`VisionSpec`, or a fixed-size input with a fixed token count), video sampling and its text
timestamps, the grounding format, the position-id function and the key under which the shard index
stores this generation's text-token count. One instance per generation lives in its own module of
this package and is listed once in `generations/__init__.py`.

Only this package (and `qvl_train/generations/`, the model side) may compare generation names;
`tests/unit/test_generation_registry_only.py` enforces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from data_pipelines.vision import VisionSpec

GROUNDING_FORMATS = ("qwen_vl_tags", "special_tokens", "json_absolute", "json_relative")
"""How a box part is written (`data_pipelines.text.render_boxes`):

* `qwen_vl_tags`:   `<ref>label</ref><box>(x1,y1),(x2,y2)</box>`, coordinates floor(x/W·1000) on [0, 1000);
* `special_tokens`: the same with `<|object_ref_start|>…<|box_end|>` special tokens (Qwen2-VL);
* `json_absolute`:  a ```json block of `{"bbox_2d": [...], "label": ...}` in pixels of the resized image
                    the model sees (Qwen2.5-VL);
* `json_relative`:  the same JSON with round(x/W·1000) on [0, 1000] (Qwen3-VL).
"""


@dataclass(frozen=True)
class VideoRules:
    """How a generation's HF video processor samples, sizes and announces a video.

    `timestamps=False` (Qwen2/2.5-VL): frames at `fps` rounded down to whole temporal patches, each
    frame bounded by `pixels`, one `<|vision_start|>` + pads + `<|vision_end|>` run for the whole video.
    `timestamps=True` (Qwen3-VL): `n = total/fps·target_fps` frames by linspace, the pixel budget over
    all frames, and per temporal patch a `<t seconds>` text, then its own start/pads/end run.
    """

    timestamps: bool
    pixels: tuple[int, int]
    """Default (min_pixels, max_pixels) of the HF video processor (transformers 4.57.6 class defaults)."""


@dataclass(frozen=True)
class DataSpec:
    """One generation's data rules (module docstring)."""

    name: str
    special_tokens: Callable[[], dict]
    """Special token → id of this generation's tokenizer (its added tokens; ids are never written as
    literals elsewhere: templates, models and exports ask this table or the tokenizer)."""
    image: VisionSpec
    """Patch size, merge size, temporal patch size, mean/std and pixel bounds of image preprocessing."""
    positions: Callable[..., object]
    """`positions(input_ids, image_grid_thw, video_grid_thw, merge_size, video_second_per_grid,
    tokens_per_second) -> LongTensor [3, n]` of one sample."""
    grounding: str
    """One of `GROUNDING_FORMATS`."""
    default_system: bool
    """The chat template adds `DEFAULT_SYSTEM` when a conversation has no system turn."""
    think_tokens: bool
    """`<think>` / `</think>` are added tokens of the tokenizer (elsewhere they are plain BPE text)."""
    image_tokens: tuple[str, str, str] = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    """Start, pad and end token of an image (their ids: `QwenTokenizer.special`)."""
    video_tokens: tuple[str, str, str] = ("<|vision_start|>", "<|video_pad|>", "<|vision_end|>")
    video: Optional[VideoRules] = None
    """None: the generation takes no video (a video part is a counted `bad_video` rejection)."""
    video_absolute_time: bool = False
    """Video temporal position ids advance `second_per_grid · tokens_per_second` per temporal patch
    (Qwen2.5-VL), instead of 1."""
    fixed_image: Optional[Callable[..., tuple]] = None
    """A fixed-size input instead of dynamic resolution: `fixed_image(pil, as_codes) -> (pixels, grid)`
    (Qwen-VL's 448² transform); None = `smart_resize` + patchify with `image`."""
    fixed_image_lut: Optional[Callable[[], object]] = None
    """The [3, 256] normalisation table of a fixed-size input (its own arithmetic)."""
    fixed_image_tokens: int = 0
    """LLM tokens of every image when > 0 (Qwen-VL's 256 resampler queries), else t·h·w / merge²."""
    count_key: str = ""
    """Key of this generation's text-token count in the shard index (`n_text_tokens_by_generation`);
    generations with the same template share one (default: the name)."""

    def __post_init__(self) -> None:
        if self.grounding not in GROUNDING_FORMATS:
            raise ValueError(f"{self.name}: grounding={self.grounding!r}; valid: {', '.join(GROUNDING_FORMATS)}")
        if not self.count_key:
            object.__setattr__(self, "count_key", self.name)

    def image_token_count(self, grid_thw) -> int:
        """LLM tokens of one image of patch grid (t, h, w)."""
        if self.fixed_image_tokens:
            return self.fixed_image_tokens
        t, h, w = grid_thw
        return int(t) * int(h) * int(w) // (self.image.merge_size * self.image.merge_size)
