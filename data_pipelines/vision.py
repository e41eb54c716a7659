"""Image preprocessing for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, normalisation, patchify.

Public API::

    pixel_values, grid_thw = preprocess_image(pil_image, "qwen2_5_vl", min_pixels=None, max_pixels=None)
    # pixel_values: torch.float32 [N, C*T*P*P]; grid_thw: (1, H/P, W/P) in patches

This reproduces `transformers.Qwen2VLImageProcessor` (the slow PIL/numpy one, transformers 4.57.x)
step by step, so the pixels the model sees in training are the pixels it sees at inference with HF
(tested equal within 1e-5 for PIL modes RGB, L, LA, RGBA, P, CMYK and sizes from 1x1 up):

1. convert to RGB exactly as HF's `convert_to_rgb`: `Image.convert("RGB")` unless already RGB. That
   does NOT composite transparent pixels over white: RGBA/LA/PA drop alpha and keep the colour
   stored under it (PIL's convert), P maps through the palette, CMYK uses PIL's naive inversion;
2. `smart_resize`: round each side to a multiple of `factor = patch * merge` (28 for Qwen2/2.5-VL,
   32 for Qwen3-VL) and
   scale to stay within [min_pixels, max_pixels], keeping the aspect ratio;
3. resize with PIL BICUBIC on the uint8 image (HF converts to PIL and back);
4. rescale by 1/255 (float64 then float32, as HF), normalise with the OpenAI CLIP mean/std;
5. repeat the frame `T = temporal_patch_size` times and cut into patches:
   `pixel_values[t*h*w, C*T*p*p]` with rows ordered (t, h-block, w-block, mh, mw) — each
   merge x merge group of patches is contiguous, which the projector relies on — and columns
   ordered (C, T, ph, pw). `grid_thw = (1, h/p, w/p)` counts patches, not LLM tokens; the LLM sees
   `t*h*w / merge^2` tokens per image.

The visual token cost of an image is known from its stored (h, w) alone (`image_token_count`),
which lets the stream plan and pack without decoding.

Per-generation settings (`VISION_SPECS`)
----------------------------------------
* `qwen2_vl`, `qwen2_5_vl`: patch 14, merge 2, T 2, OpenAI CLIP mean/std, pixels 56*56 .. 28*28*1280
  (the defaults of `Qwen2VLImageProcessor` in transformers 4.57.6; the hub's preprocessor_config.json
  of the released checkpoints allows up to 12,845,056 pixels — pass `max_pixels` to use that).
* `qwen3_vl` (and `qwen3_vl_moe`): patch 16, merge 2, T 2, mean = std = 0.5, pixels 65,536 ..
  16,777,216. transformers 4.57.6 has no Qwen3-VL image processor class: `AutoImageProcessor` maps
  `qwen3_vl` to `Qwen2VLImageProcessor(Fast)` with the released checkpoints' preprocessor_config.json
  (`size = {shortest_edge: 65536, longest_edge: 16777216}`, patch 16, mean/std 0.5). Beware: the slow
  class's `__init__` in 4.57.6 ignores a `size` dict (it always resets it to 56*56 .. 28*28*1280); only
  `min_pixels` / `max_pixels` arguments take effect, so pass them explicitly when comparing.
* `qwen_vl` (Qwen-VL v1) uses a fixed 448x448 input, not patches: not served by `preprocess_image`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
MAX_SOURCE_PIXELS = 64 * 1024 * 1024
"""Decompression-bomb guard: refuse to decode images whose header claims more pixels than this."""


class BadImage(ValueError):
    """An image that cannot (or must not) be decoded; the stream skips the sample."""


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect kept.

    Identical to HF's rule (including Python's round-half-to-even in `round`), so planning and
    preprocessing agree with `Qwen2VLImageProcessor` to the pixel.
    """
    if min(height, width) < 1:
        raise ValueError(f"image of {width}x{height} pixels (w x h) is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {width}x{height} pixels (w x h) has aspect ratio {max(height, width) / min(height, width):.1f}, "
            f"over the limit of {MAX_ASPECT_RATIO} of Qwen's smart_resize (and of the HF processor); "
            "crop or pad it to at most 200:1"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_token_count(
    height: int, width: int, *, patch_size: int = 14, merge_size: int = 2, min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> int:
    """LLM tokens of one image of source size (height, width): (h/p)*(w/p)/merge^2 after smart_resize."""
    rh, rw = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return (rh // patch_size) * (rw // patch_size) // (merge_size * merge_size)


def decode_image(data: bytes, max_source_pixels: int = MAX_SOURCE_PIXELS) -> Image.Image:
    """Bytes → RGB PIL image. Raises BadImage for undecodable data or oversized headers.

    The pixel check happens on the header before any pixel is decoded, so a tiny file claiming a
    gigapixel image cannot exhaust memory.
    """
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w <= 0 or h <= 0 or w * h > max_source_pixels:
            raise BadImage(f"image of {w}x{h} pixels exceeds the limit of {max_source_pixels}")
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadImage(f"undecodable image: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class VisionSpec:
    """Image preprocessing settings of one model generation."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


_QWEN2 = VisionSpec(14, 2, 2, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 56 * 56, 28 * 28 * 1280)
_QWEN3 = VisionSpec(16, 2, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 65536, 16777216)
VISION_SPECS: dict[str, VisionSpec] = {
    "qwen2_vl": _QWEN2, "qwen2_5_vl": _QWEN2, "qwen3_vl": _QWEN3, "qwen3_vl_moe": _QWEN3,
}


def vision_spec(generation: str) -> VisionSpec:
    try:
        return VISION_SPECS[generation]
    except KeyError:
        raise ValueError(
            f"generation {generation!r} has no patch-based image preprocessing; use one of "
            f"{', '.join(VISION_SPECS)} (qwen_vl uses a fixed 448x448 input)"
        ) from None


def preprocess_image(
    image: Image.Image, generation: str, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """PIL image (any mode) → (pixel_values float32 [N, C*T*P*P], grid_thw (1, H/P, W/P)) for `generation`.

    Equal to transformers' `Qwen2VLImageProcessor` with the generation's settings (module docstring)
    and `input_data_format="channels_last"`. `min_pixels`/`max_pixels` default to the generation's.
    Raises ValueError for an aspect ratio over 200 (naming the limit) or an unknown generation.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL.Image.Image, got {type(image).__name__}")
    spec = vision_spec(generation)
    pv, grid = patchify_image(
        image, patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.merge_size, min_pixels=spec.min_pixels if min_pixels is None else int(min_pixels),
        max_pixels=spec.max_pixels if max_pixels is None else int(max_pixels), mean=spec.mean, std=spec.std,
    )
    return torch.from_numpy(pv), grid


def patchify_image(
    img: Image.Image,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Image → (numpy pixel_values float32 [h*w patches, C*T*p*p], grid_thw (1, h/p, w/p)); the
    settings are explicit (the stream passes its config's). See `preprocess_image` for the public API."""
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels={max_pixels} must be >= min_pixels={min_pixels}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    rh, rw = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), resample=Image.BICUBIC)
    arr = np.asarray(img)  # [H, W, C] uint8
    # Fast path, bit-identical to "rescale (float64) -> float32 -> normalise -> patchify": the pixels
    # are uint8, so the whole float pipeline is a 256-entry table per channel (`_norm_lut`, computed
    # with exactly those float ops). The patch reordering is done on the uint8 bytes (4x less memory
    # traffic than on float32), the table lookup writes straight into the output, and the T identical
    # frames are one copy of the first.
    m, p, t = merge_size, patch_size, temporal_patch_size
    gh, gw = rh // p, rw // p
    # [H, W, C] -> (h-block, mh, ph, w-block, mw, pw, C) -> (h-block, w-block, mh, mw, C, ph, pw)
    u8 = arr.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    u8 = np.ascontiguousarray(u8).reshape(gh * gw, 3, p * p)
    lut = _norm_lut(tuple(mean), tuple(std))
    out = np.empty((gh * gw, 3, t, p * p), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], u8[:, c], out=out[:, c, 0])
    if t > 1:
        out[:, :, 1:] = out[:, :, :1]
    return out.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)


_LUTS: dict[tuple, np.ndarray] = {}


def _norm_lut(mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: uint8 value v of channel c -> ((v * (1/255) in float64 -> float32) - mean) / std,
    with the same float32 operations (and rounding) as the array pipeline of the HF processor."""
    key = (mean, std)
    lut = _LUTS.get(key)
    if lut is None:
        v = (np.arange(256, dtype=np.float64) * (1.0 / 255.0)).astype(np.float32)
        lut = (v[None, :] - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
        lut = np.ascontiguousarray(lut.astype(np.float32))
        _LUTS[key] = lut
    return lut


def patchify(
    frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Frames [F, C, H, W] → pixel_values [t*h*w, C*T*p*p], grid (t, h, w) in patches.

    The last frame is repeated up to a multiple of T (one image becomes T identical frames).
    """
    f, c, hh, ww = frames.shape
    if f % temporal_patch_size:
        pad = np.repeat(frames[-1:], temporal_patch_size - f % temporal_patch_size, axis=0)
        frames = np.concatenate([frames, pad], axis=0)
    gt = frames.shape[0] // temporal_patch_size
    gh, gw = hh // patch_size, ww // patch_size
    x = frames.reshape(
        gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size
    )
    # -> (t, h-block, w-block, mh, mw, C, T, ph, pw)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    x = np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size))
    return x, (gt, gh, gw)
