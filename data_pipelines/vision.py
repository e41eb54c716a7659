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

The loader stops before step 4: `image_codes` gives the resized uint8 pixels in patch order (one frame,
T = 1 columns), and `norm_lut(mean, std)` the [3, 256] table of their float values; the batch is
normalised on the training device (`schema.PackedBatch.to`), so decode workers ship 1 byte per value.

Speed (benchmarks/preprocess.py): after PIL's decode and resize, which the parity requires, the
loader's only work is one uint8 copy into patch order (`patch_codes`). The float path of
`preprocess_image` is one copy that reorders the uint8 pixels into patch order while converting them to
float32, three in-place float32 passes that give exactly HF's values (checked exhaustively per
mean/std), and one copy writing the T identical frames (`patchify_uint8`). Opt-in
`decode_image(..., fast_decode=True)` (`data.fast_decode`) decodes large JPEGs at reduced scale
(libjpeg draft mode): faster, not bit-identical.

Per-generation settings (`DataSpec.image` in `data_pipelines/generations/`)
--------------------------------------------------------------------------
* `qwen2_vl`, `qwen2_5_vl`: patch 14, merge 2, T 2, OpenAI CLIP mean/std, pixels 56*56 .. 28*28*1280
  (the defaults of `Qwen2VLImageProcessor` in transformers 4.57.6; the hub's preprocessor_config.json
  of the released checkpoints allows up to 12,845,056 pixels — pass `max_pixels` to use that).
* `qwen3_vl` (and `qwen3_vl_moe`): patch 16, merge 2, T 2, mean = std = 0.5, pixels 65,536 ..
  16,777,216. transformers 4.57.6 has no Qwen3-VL image processor class: `AutoImageProcessor` maps
  `qwen3_vl` to `Qwen2VLImageProcessor(Fast)` with the released checkpoints' preprocessor_config.json
  (`size = {shortest_edge: 65536, longest_edge: 16777216}`, patch 16, mean/std 0.5). Beware: the slow
  class's `__init__` in 4.57.6 ignores a `size` dict (it always resets it to 56*56 .. 28*28*1280); only
  `min_pixels` / `max_pixels` arguments take effect, so pass them explicitly when comparing.
* `qwen_vl` (Qwen-VL v1): a fixed 448x448 input (`preprocess_qwen_vl`), as the released `visual.py`
  transform `Resize((448, 448), BICUBIC) → ToTensor → Normalize(OpenAI CLIP mean/std)`: PIL bicubic to
  448x448 whatever the aspect ratio, then `(float32(v) / 255 - mean) / std` in float32 (torchvision's
  arithmetic), cut into 32x32 patches of 14 in row-major order, columns (C, ph, pw); grid (1, 32, 32).
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


def decode_image(
    data: bytes,
    max_source_pixels: int = MAX_SOURCE_PIXELS,
    *,
    fast_decode: bool = False,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> Image.Image:
    """Bytes → RGB PIL image. Raises BadImage for undecodable data or oversized headers.

    The pixel check happens on the header before any pixel is decoded, so a tiny file claiming a
    gigapixel image cannot exhaust memory. The source size is kept in `info` (`source_hw`), also
    when the pixels come at reduced scale.

    `fast_decode=True` (opt-in, `data.fast_decode`): a JPEG whose `smart_resize(factor, min_pixels,
    max_pixels)` target is at least 2x, 4x or 8x smaller on both sides is decoded at 1/2, 1/4 or 1/8
    scale (libjpeg's scaled IDCT through PIL's `Image.draft`, never below the target); the resize to
    the target then starts from those pixels. Faster on large photos, close to but not equal to the
    reference (benchmarks/RESULTS.md gives the measured difference). Other formats decode as usual.
    """
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w <= 0 or h <= 0 or w * h > max_source_pixels:
            raise BadImage(f"image of {w}x{h} pixels exceeds the limit of {max_source_pixels}")
        if fast_decode and img.format == "JPEG":
            target = _safe_target(h, w, factor, min_pixels, max_pixels)
            if target is not None:
                img.draft(None, (target[1], target[0]))
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadImage(f"undecodable image: {type(e).__name__}: {e}") from e
    img.info[_SOURCE_HW] = ((h, w), img.size)
    return img


_SOURCE_HW = "source_hw"


def source_hw(img: Image.Image) -> tuple[int, int]:
    """(height, width) of the image as stored: its size, or for an image that `decode_image` decoded
    at reduced scale (fast_decode), the size before that reduction. smart_resize targets and
    grounding coordinates are computed from this size.

    The record is trusted only while the image keeps the size it was decoded at: PIL copies `info`
    into crops and resizes, which are new pictures of their own size."""
    rec = img.info.get(_SOURCE_HW)
    if isinstance(rec, tuple) and len(rec) == 2 and rec[1] == img.size:
        return rec[0]
    return img.size[1], img.size[0]


def _safe_target(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Optional[tuple[int, int]]:
    """smart_resize target, or None where smart_resize refuses the image (the error is raised later,
    where the image is preprocessed, as without fast_decode)."""
    try:
        return smart_resize(height, width, factor, min_pixels, max_pixels)
    except ValueError:
        return None


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


def vision_spec(generation: str) -> VisionSpec:
    """The image preprocessing settings of `generation` (`DataSpec.image` of its registry entry)."""
    from data_pipelines import generations

    return generations.get(generation).image


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
    from data_pipelines import generations

    gen = generations.get(generation)
    if gen.fixed_image is not None:
        pv, grid = gen.fixed_image(image, as_codes=False)
        return torch.from_numpy(pv), grid
    spec = gen.image
    pv, grid = patchify_image(
        image, patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.merge_size, min_pixels=spec.min_pixels if min_pixels is None else int(min_pixels),
        max_pixels=spec.max_pixels if max_pixels is None else int(max_pixels), mean=spec.mean, std=spec.std,
    )
    return torch.from_numpy(pv), grid


QWEN_VL_IMAGE_SIZE = 448
QWEN_VL_PATCH = 14
QWEN_VL_IMAGE_TOKENS = 256
"""LLM tokens of every Qwen-VL image, whatever its size (the resampler's queries)."""


def planned_image_tokens(generation: str, height: int, width: int, **bounds) -> int:
    """LLM tokens of one image of source size (height, width) under `generation`: 256 for Qwen-VL,
    else `image_token_count(height, width, **bounds)` (patch_size, merge_size, min/max_pixels)."""
    from data_pipelines import generations

    fixed = generations.get(generation).fixed_image_tokens
    return fixed if fixed else image_token_count(height, width, **bounds)


def preprocess_qwen_vl(
    img: Image.Image, size: int = QWEN_VL_IMAGE_SIZE, patch: int = QWEN_VL_PATCH
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Qwen-VL: any image → (float32 [(size/patch)², 3·patch²] pixel_values, grid (1, size/patch, size/patch))."""
    codes, grid = qwen_vl_codes(img, size, patch)
    return apply_lut(codes, qwen_vl_lut()).reshape(codes.shape[0], -1), grid


def qwen_vl_codes(img: Image.Image, size: int = QWEN_VL_IMAGE_SIZE, patch: int = QWEN_VL_PATCH) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Qwen-VL, what the loader ships: uint8 codes [(size/patch)², 3, 1, patch²] (rows row-major, columns
    (C, ph, pw)) of the 448² bicubic resize; `qwen_vl_lut()` gives their float values."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.BICUBIC)
    return patch_codes(img, patch, 1)  # merge 1: rows are the patches in row-major order


def qwen_vl_lut() -> np.ndarray:
    """[3, 256] float32: uint8 v of channel c → `(float32(v) / 255 - mean) / std` in float32 with the OpenAI
    CLIP mean/std: torchvision's ToTensor + Normalize arithmetic of Qwen-VL's released transform."""
    key = ("qwen_vl",)
    if key not in _LUTS:
        v = np.arange(256, dtype=np.float32) / np.float32(255)
        lut = (v[None, :] - np.asarray(OPENAI_CLIP_MEAN, np.float32)[:, None]) / np.asarray(OPENAI_CLIP_STD, np.float32)[:, None]
        _LUTS[key] = np.ascontiguousarray(lut.astype(np.float32))
    return _LUTS[key]


def apply_lut(codes: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 codes [N, C, T', K] → float32 [N, C, T', K]: `lut[c, v]` for each value v of channel c."""
    out = np.empty(codes.shape, dtype=lut.dtype)
    for c in range(codes.shape[1]):
        np.take(lut[c], codes[:, c], out=out[:, c])
    return out


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
    frame = np.asarray(resized_image(img, patch_size * merge_size, min_pixels, max_pixels))  # [H, W, 3]
    return patchify_uint8(frame[None], patch_size, temporal_patch_size, merge_size, mean, std)


def resized_image(img: Image.Image, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    """Steps 1-3 of the module docstring: the RGB image at its smart_resize target (RGB conversion as
    HF's, PIL bicubic on uint8)."""
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels={max_pixels} must be >= min_pixels={min_pixels}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    height, width = source_hw(img)
    rh, rw = smart_resize(height, width, factor, min_pixels, max_pixels)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), resample=Image.BICUBIC)
    return img


def image_codes(
    img: Image.Image, *, patch_size: int = 14, merge_size: int = 2, min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """What the loader ships per image: (uint8 codes [h*w patches, C, 1, p*p], grid (1, h/p, w/p)).

    The resized image's bytes in patch order, ONE frame, no normalisation: `norm_lut(mean, std)[c, v]`
    turns code v of channel c into HF's float, and the T identical frames are written when the batch is
    packed (`stream.pack`); `PackedBatch.to(device)` normalises on the training device. Rows and
    columns are those of `patchify_image` with T = 1, so for every generation
    `norm_lut(...)[c, codes]` repeated T times along axis 2 is `patchify_image`'s output bit for bit.
    """
    return patch_codes(resized_image(img, patch_size * merge_size, min_pixels, max_pixels), patch_size, merge_size)


def patch_codes(img: Image.Image, patch_size: int, merge_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB image (sides multiples of patch*merge) → uint8 [h*w, C, 1, p*p] in pixel_values row order
    (t, h-block, w-block, mh, mw) and column order (C, ph, pw), grid (1, h, w).

    Fast because it moves whole rows of a patch at once: PIL splits the image into channel planes, and
    in planes each patch row is p contiguous bytes, so the reorder copies p-byte items (a numpy void
    view) instead of single bytes strided by the channel count (~3 ms for 1148x840 here, against
    ~5 ms for the bytewise transpose of the interleaved RGB array and ~11 ms for `patchify_uint8`'s
    float32 output)."""
    p, m = patch_size, merge_size
    w, h = img.size
    gh, gw = h // p, w // p
    planes = np.empty((3, h, w), dtype=np.uint8)
    for c, band in enumerate(img.split()):
        planes[c] = np.asarray(band)
    rows = planes.view(np.dtype((np.void, p))).reshape(3, gh // m, m, p, gw // m, m)  # items: p pixels of a patch row
    x = rows.transpose(1, 4, 2, 5, 0, 3)  # -> (h-block, w-block, mh, mw, C, ph), each item (pw)
    return np.ascontiguousarray(x).view(np.uint8).reshape(gh * gw, 3, 1, p * p), (1, gh, gw)


def patchify_uint8(
    frames: np.ndarray,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [F, H, W, C] (already resized to multiples of patch*merge) → normalised
    pixel_values float32 [t*h*w, C*T*p*p] and grid (t, h, w), bit-identical to HF's float pipeline
    "rescale 1/255 in float64 → float32 → (x - mean) / std in float32 → patchify" (see `patchify` for
    the layout; the last frame is repeated up to a multiple of T).

    Fast because the patch reordering and the conversion to float32 are one copy, the arithmetic is
    three in-place float32 passes, and a single frame (an image) is reordered and normalised once,
    its T copies written by one last copy (`_normalise_values`).
    """
    f, hh, ww, c = frames.shape
    p, m, t = patch_size, merge_size, temporal_patch_size
    gh, gw = hh // p, ww // p
    if f == 1:  # one image: T identical frames
        gt, tt = 1, 1
    else:
        if f % t:
            frames = np.concatenate([frames, np.repeat(frames[-1:], t - f % t, axis=0)], axis=0)
        gt, tt = frames.shape[0] // t, t
    # -> (t, h-block, w-block, mh, mw, C, T, ph, pw), a view; copied below one row of h-blocks at a time
    x = frames.reshape(gt, tt, gh // m, m, p, gw // m, m, p, c).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    per_row = gw * m  # patches in one row of merge blocks
    out = np.empty((gt, gh // m, per_row, c, t, p * p), dtype=np.float32)
    rows = max(1, _CHUNK_PATCHES // per_row)
    buf = None if tt == t else np.empty((rows, per_row, c, tt, p * p), dtype=np.float32)
    for g in range(gt):
        for i in range(0, gh // m, rows):
            src, dst = x[g, i:i + rows], out[g, i:i + rows]
            k = src.shape[0]
            vals = dst if buf is None else buf[:k]
            np.copyto(vals.reshape(src.shape), src, casting="unsafe")  # reorder + uint8 -> float32, one copy
            _normalise_values(vals.reshape(k * per_row, c, tt, p * p), mean, std, dst.reshape(k * per_row, c, t, p * p))
    return out.reshape(gt * gh * gw, c * t * p * p), (gt, gh, gw)


_CHUNK_PATCHES = 256
"""Patches converted and normalised per step of `patchify_uint8` (~0.6 MB of float32 at patch 14):
the intermediate stays in the CPU cache between the passes instead of going to memory and back."""


def normalise_uint8(
    u8: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float], repeat: int = 1
) -> np.ndarray:
    """uint8 [N, C, T', K] → float32 [N, C, T, K], normalised exactly as HF does it.

    T = T' when T' > 1; a single frame (T' = 1) is repeated `repeat` times, so an image's T identical
    frames cost one normalisation. Values: `(v / 255 - mean[c]) / std[c]` computed in float32, which
    equals HF's "v * (1/255) in float64, cast to float32, minus/divide in float32" for every uint8 v.
    """
    n, c, tt, k = u8.shape
    vals = np.empty(u8.shape, dtype=np.float32)
    np.copyto(vals, u8, casting="unsafe")
    out = vals if tt > 1 or repeat == 1 else np.empty((n, c, repeat, k), dtype=np.float32)
    _normalise_values(vals, mean, std, out)
    return out


def _normalise_values(vals: np.ndarray, mean: tuple, std: tuple, out: np.ndarray) -> None:
    """float32 [N, C, T', K] holding uint8 values → normalised into out [N, C, T, K] (T' = T, then
    out may be vals itself, or T' = 1: the frame is written T times). See `normalise_uint8`.

    Divide, subtract, divide in place, then write the T copies of a single frame. The equality with
    HF's float64 rescale is checked once per (mean, std), exhaustively, against the 256-entry table
    `norm_lut` (`_float_path_exact`); should it ever fail (another numpy build), the table is used."""
    mean, std = tuple(mean), tuple(std)
    if _float_path_exact(mean, std):
        _normalise_float(vals, mean, std, out)
    else:
        c = vals.shape[1]
        out[...] = norm_lut(mean, std)[np.arange(c)[None, :, None, None], vals.astype(np.uint8)]


def _normalise_float(f: np.ndarray, mean: tuple, std: tuple, out: np.ndarray) -> None:
    """The float32 arithmetic of `_normalise_values`, in place on f, then broadcast into out.

    numpy, single-threaded on purpose: the chunks are small, and a thread pool (torch's) costs more
    than it saves on them, badly so on a busy machine."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    np.divide(f, np.float32(255), out=f)
    np.subtract(f, m, out=f)
    np.divide(f, s, out=f)
    if not np.may_share_memory(f, out):  # disjoint buffers, or out is f (T' = T)
        np.copyto(out, f)  # broadcasts a single frame to the T copies


_EXACT: dict[tuple, bool] = {}


def _float_path_exact(mean: tuple, std: tuple) -> bool:
    """Whether `_normalise_float` equals the table `norm_lut` for all 256 values of every channel
    (odd lengths included, so vectorised loops and their scalar tails are both covered)."""
    key = (mean, std)
    if key not in _EXACT:
        v = (np.arange(3 * 259) % 256).astype(np.uint8).reshape(3, 1, 1, 259)
        x = np.ascontiguousarray(np.broadcast_to(v, (3, 3, 1, 259)))
        got = np.empty((3, 3, 2, 259), dtype=np.float32)
        _normalise_float(x.astype(np.float32), mean, std, got)
        want = norm_lut(mean, std)[np.arange(3)[None, :, None, None], x]
        _EXACT[key] = bool(np.array_equal(got, np.broadcast_to(want, got.shape)))
    return _EXACT[key]


_LUTS: dict[tuple, np.ndarray] = {}


def norm_lut(mean: tuple, std: tuple) -> np.ndarray:
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


def unpatchify(
    pixel_values: np.ndarray, grid_thw: tuple[int, int, int], patch_size: int, temporal_patch_size: int, merge_size: int
) -> np.ndarray:
    """The inverse of `patchify`: pixel_values [t*h*w, C*T*p*p] → frames [t*T, C, h*p, w*p]."""
    gt, gh, gw = (int(x) for x in grid_thw)
    p, t, m = patch_size, temporal_patch_size, merge_size
    c = pixel_values.shape[1] // (t * p * p)
    x = pixel_values.reshape(gt, gh // m, gw // m, m, m, c, t, p, p)
    x = x.transpose(0, 6, 5, 1, 3, 7, 2, 4, 8)  # -> (t, T, C, h-block, mh, ph, w-block, mw, pw)
    return np.ascontiguousarray(x.reshape(gt * t, c, gh * p, gw * p))


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
