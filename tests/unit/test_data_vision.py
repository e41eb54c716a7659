"""Image preprocessing parity with transformers' slow Qwen2VLImageProcessor, and decode guards."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor, smart_resize as hf_smart_resize

from data_pipelines.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BadImage,
    decode_image,
    image_token_count,
    patchify_image,
    smart_resize,
)

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64  # small max so the downscale branch is exercised


def test_smart_resize_matches_hf():
    rng = random.Random(0)
    sizes = [(rng.randint(10, 3000), rng.randint(10, 3000)) for _ in range(500)] + [(28, 28), (14, 42), (42, 70), (2, 300)]
    for h, w in sizes:
        for mx in (MAX_PIXELS, 28 * 28 * 1280):
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ValueError):
                    smart_resize(h, w, 28, MIN_PIXELS, mx)
                continue
            assert smart_resize(h, w, 28, MIN_PIXELS, mx) == hf_smart_resize(h, w, 28, MIN_PIXELS, mx)
    with pytest.raises(ValueError):
        smart_resize(1, 500)


def _render(w, h, seed):
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randint(0, w - 2), rng.randint(0, h - 2)
        d.ellipse((x0, y0, rng.randint(x0 + 1, w), rng.randint(y0 + 1, h)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    d.text((2, 2), "Qwen", fill=(0, 0, 0))
    return img


@pytest.mark.parametrize("w,h", [(56, 56), (100, 37), (224, 90), (61, 223), (500, 300), (33, 33)])
def test_patchify_matches_hf_image_processor(w, h):
    hf = Qwen2VLImageProcessor(
        do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True,
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    img = _render(w, h, seed=w * 1000 + h)
    ref = hf(images=[img], return_tensors="np")
    pv, grid = patchify_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert tuple(ref["image_grid_thw"][0]) == grid
    assert pv.shape == ref["pixel_values"].shape and pv.dtype == np.float32
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-5, rtol=0)
    assert image_token_count(h, w, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == grid[1] * grid[2] // 4


def test_patch_layout_merge_groups_are_contiguous():
    # A 56x56 image is a 4x4 patch grid, 2x2 merge blocks: rows 0..3 must be the top-left block.
    arr = np.zeros((1, 3, 56, 56), dtype=np.float32)
    for py in range(4):
        for px in range(4):
            arr[:, :, py * 14:(py + 1) * 14, px * 14:(px + 1) * 14] = py * 4 + px
    from data_pipelines.vision import patchify

    pv, grid = patchify(arr, 14, 2, 2)
    assert grid == (1, 4, 4)
    assert [int(r[0]) for r in pv] == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def test_decode_guards():
    buf = io.BytesIO()
    Image.new("L", (40, 30), 128).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (40, 30)
    with pytest.raises(BadImage):
        decode_image(buf.getvalue(), max_source_pixels=1000)  # bomb guard on the header
    with pytest.raises(BadImage):
        decode_image(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(BadImage):
        decode_image(buf.getvalue()[:60])  # truncated


# ------------------------------------------------------------------ public API: preprocess_image
from data_pipelines.vision import preprocess_image, vision_spec  # noqa: E402

_HF_CACHE = {}


def _hf(generation, min_pixels, max_pixels):
    spec = vision_spec(generation)
    key = (generation, min_pixels, max_pixels)
    if key not in _HF_CACHE:  # settings of the released checkpoints (see vision.py); min/max passed explicitly
        _HF_CACHE[key] = Qwen2VLImageProcessor(
            image_mean=list(spec.mean), image_std=list(spec.std), min_pixels=min_pixels, max_pixels=max_pixels,
            patch_size=spec.patch_size, temporal_patch_size=2, merge_size=2,
        )
    return _HF_CACHE[key]


def _in_mode(img, mode):
    if mode == "RGBA":
        out = img.convert("RGBA")
        out.putalpha(Image.linear_gradient("L").resize(img.size))  # varied alpha
        return out
    if mode == "LA":
        out = img.convert("LA")
        out.putalpha(Image.linear_gradient("L").resize(img.size))
        return out
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return img.convert(mode)


MODES = ("RGB", "L", "LA", "RGBA", "P", "CMYK")
SIZES = [(1, 1), (2, 1), (1, 200), (1000, 5), (5, 1000), (37, 61), (100, 1), (333, 500)]


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_preprocess_image_matches_hf_grid_of_modes_and_sizes(generation):
    spec = vision_spec(generation)
    if generation == "qwen2_5_vl":  # same image processor settings as Qwen2-VL: one case suffices
        assert spec == vision_spec("qwen2_vl")
        img = _in_mode(_render(90, 50, seed=1), "RGBA")
        ref = _hf(generation, spec.min_pixels, spec.max_pixels)(images=[img], return_tensors="np")
        pv, grid = preprocess_image(img, generation)
        np.testing.assert_allclose(pv.numpy(), ref["pixel_values"], atol=1e-5, rtol=0)
        return
    bounds = [(spec.min_pixels, spec.max_pixels), (56 * 56, 28 * 28 * 32)]  # defaults, and a downscaling cap
    cases = [(w, h, m) for (w, h) in SIZES for m in MODES] + [(1500, 1100, "RGB"), (2100, 400, "RGBA")]
    for w, h, mode in cases:
        img = _in_mode(_render(max(w, 2), max(h, 2), seed=w * 7 + h).resize((w, h)), mode)
        for mn, mx in bounds if mode in ("RGB", "P") else bounds[:1]:
            if (w, h) in ((1500, 1100), (2100, 400)) and mx > 28 * 28 * 1280:
                mx = 28 * 28 * 1280  # keep the large cases fast
            pv, grid = preprocess_image(img, generation, min_pixels=mn, max_pixels=mx)
            if (mn, mx) == (spec.min_pixels, spec.max_pixels):
                pv_default, grid_default = preprocess_image(img, generation)
                assert grid_default == grid and torch.equal(pv_default, pv)
            ref = _hf(generation, mn, mx)(images=[img], return_tensors="np", input_data_format="channels_last")
            assert isinstance(pv, torch.Tensor) and pv.dtype == torch.float32
            assert tuple(int(v) for v in ref["image_grid_thw"][0]) == grid, (w, h, mode, mn, mx)
            assert pv.shape == (grid[1] * grid[2], 3 * 2 * spec.patch_size**2)
            np.testing.assert_allclose(pv.numpy(), ref["pixel_values"], atol=1e-5, rtol=0, err_msg=f"{w}x{h} {mode}")


def test_preprocess_image_limits_and_large_grids():
    with pytest.raises(ValueError, match="aspect ratio 333.3, over the limit of 200"):
        preprocess_image(Image.new("RGB", (1000, 3)), "qwen2_vl")
    with pytest.raises(ValueError, match="over the limit of 200"):
        preprocess_image(Image.new("L", (3, 1000)), "qwen3_vl")
    assert preprocess_image(Image.new("RGB", (8, 8)), "qwen_vl")[1] == (1, 32, 32)  # fixed 448² (test_qwen_vl_data.py)
    # 8000x8000 and other large sizes: grids only (the full preprocessing would be slow)
    for generation, factor in (("qwen2_vl", 28), ("qwen3_vl", 32)):
        spec = vision_spec(generation)
        for h, w in [(8000, 8000), (8000, 40), (7999, 6001), (4000, 3000), (1, 1), (200, 40000)]:
            ours = smart_resize(h, w, factor, spec.min_pixels, spec.max_pixels)
            assert ours == hf_smart_resize(h, w, factor, spec.min_pixels, spec.max_pixels)
            assert ours[0] % factor == 0 and ours[1] % factor == 0
            assert spec.min_pixels <= ours[0] * ours[1] <= spec.max_pixels
