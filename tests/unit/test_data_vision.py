"""Image preprocessing parity with transformers' slow Qwen2VLImageProcessor, and decode guards."""

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from data_pipelines.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BadImage,
    decode_image,
    image_token_count,
    preprocess_image,
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
    pv, grid = preprocess_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
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
