"""Fast image preprocessing: exact (bit-identical to HF) by default, opt-in JPEG draft decoding."""

import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from data_pipelines.schema import DataConfig
from data_pipelines.stream import SampleBuilder
from data_pipelines.text import get_tokenizer
from data_pipelines.vision import (
    _float_path_exact,
    apply_lut,
    decode_image,
    norm_lut,
    normalise_uint8,
    patchify,
    patchify_image,
    patchify_uint8,
    source_hw,
    vision_spec,
)

SPEC = vision_spec("qwen2_5_vl")
MAX_PIXELS = 28 * 28 * 256  # a smaller budget than the default keeps the images (and the test) small
BOUNDS = dict(factor=SPEC.factor, min_pixels=SPEC.min_pixels, max_pixels=MAX_PIXELS)
FAST_MAX_DIFF, FAST_MEAN_DIFF = 0.3, 0.04
"""Stated bound of fast_decode vs exact pixel_values (normalised units; one uint8 step is ~0.015,
so ~20 and ~3 steps); measured in benchmarks/RESULTS.md per size bucket."""


def _jpeg(w, h, seed=0, quality=90):
    """Photo-like JPEG: smooth gradients plus noise (as in benchmarks/preprocess.py)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 97 + yy / 131), 128 + 100 * np.cos(yy / 83),
                     128 + 100 * np.sin((xx + yy) / 211)], axis=-1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _settings(spec=SPEC):
    return dict(patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
                min_pixels=spec.min_pixels, max_pixels=MAX_PIXELS, mean=spec.mean, std=spec.std)


@pytest.fixture(scope="module")
def large_jpeg():
    return _jpeg(1600, 1200, seed=3)


def test_float_normalisation_equals_hf_table_for_every_uint8():
    for spec in (vision_spec("qwen2_vl"), vision_spec("qwen3_vl")):
        assert _float_path_exact(tuple(spec.mean), tuple(spec.std))
        u8 = (np.arange(3 * 300) % 256).astype(np.uint8).reshape(1, 3, 1, 300)
        got = normalise_uint8(u8, spec.mean, spec.std, repeat=2)
        want = norm_lut(tuple(spec.mean), tuple(spec.std))[np.arange(3)[:, None], u8[0, :, 0]]
        assert got.shape == (1, 3, 2, 300)
        assert np.array_equal(got[0, :, 0], want) and np.array_equal(got[0, :, 1], want)


@pytest.mark.parametrize("frames", [1, 2, 3, 4])
def test_patchify_uint8_equals_float_patchify(frames):
    """Video frames: uint8 reordering + normalisation equals normalise-then-`patchify` bit for bit."""
    rng = np.random.default_rng(frames)
    u8 = rng.integers(0, 256, (frames, 56, 84, 3), dtype=np.uint8)
    vals = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    vals = (vals - np.asarray(SPEC.mean, np.float32)) / np.asarray(SPEC.std, np.float32)
    ref, ref_grid = patchify(vals.transpose(0, 3, 1, 2), 14, 2, 2)
    got, grid = patchify_uint8(u8, 14, 2, 2, SPEC.mean, SPEC.std)
    assert grid == ref_grid == ((frames + 1) // 2, 4, 6)
    assert got.dtype == np.float32 and np.array_equal(got, ref)


def test_fast_decode_off_is_bit_identical_to_hf():
    blob = _jpeg(700, 500, seed=1)
    hf = Qwen2VLImageProcessor(image_mean=list(SPEC.mean), image_std=list(SPEC.std), min_pixels=SPEC.min_pixels,
                               max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2)
    ref = hf(images=[Image.open(io.BytesIO(blob))], return_tensors="np")["pixel_values"]
    for img in (decode_image(blob), decode_image(blob, fast_decode=False, **BOUNDS)):
        assert img.size == (700, 500) and source_hw(img) == (500, 700)
        pv, _ = patchify_image(img, **_settings())
        assert np.array_equal(pv, ref)


def _cpu_ms(fn, blob, reps=3):
    out = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn(blob)
        out.append(time.thread_time() - t0)
    return sorted(out)[reps // 2] * 1e3


def test_fast_decode_on_large_jpeg_is_faster_and_close(large_jpeg):
    exact = decode_image(large_jpeg)
    fast = decode_image(large_jpeg, fast_decode=True, **BOUNDS)
    # target 504x364 (w x h) is over 3x smaller on both sides: decoded at 1/2 scale (1/4 would be below it)
    assert fast.size == (800, 600) and source_hw(fast) == (1200, 1600) == source_hw(exact)
    half = fast.resize((400, 300))  # a new picture (PIL copies info): its own size counts
    assert source_hw(half) == (300, 400) and source_hw(fast.convert("L")) == (1200, 1600)
    pv_exact, grid_exact = patchify_image(exact, **_settings())
    pv_fast, grid_fast = patchify_image(fast, **_settings())
    assert grid_fast == grid_exact == (1, 26, 36)
    diff = np.abs(pv_fast - pv_exact)
    assert 0 < diff.max() < FAST_MAX_DIFF and diff.mean() < FAST_MEAN_DIFF, (diff.max(), diff.mean())

    def run(fast_decode):
        return lambda b: patchify_image(decode_image(b, fast_decode=fast_decode, **BOUNDS), **_settings())

    t_exact, t_fast = _cpu_ms(run(False), large_jpeg), _cpu_ms(run(True), large_jpeg)
    assert t_fast < 0.8 * t_exact, (t_fast, t_exact)


def test_fast_decode_scales_and_other_formats(large_jpeg):
    # a small pixel budget: the target 56x56 is over 8x smaller -> 1/8 scale, never below the target
    img = decode_image(large_jpeg, fast_decode=True, factor=28, min_pixels=56 * 56, max_pixels=56 * 84)
    assert img.size == (200, 150) and source_hw(img) == (1200, 1600)
    pv, grid = patchify_image(img, patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56,
                              max_pixels=56 * 84)
    assert grid == (1, 4, 4) and pv.shape == (16, 1176)
    # a target less than 2x smaller: full-scale decode, identical to the exact path
    blob = _jpeg(600, 400, seed=2)
    assert np.array_equal(np.asarray(decode_image(blob, fast_decode=True, **BOUNDS)), np.asarray(decode_image(blob)))
    # PNG (and any non-JPEG): fast_decode has no effect
    buf = io.BytesIO()
    Image.open(io.BytesIO(large_jpeg)).save(buf, format="PNG", compress_level=1)
    png = decode_image(buf.getvalue(), fast_decode=True, **BOUNDS)
    assert png.size == (1600, 1200) and source_hw(png) == (1200, 1600)


def test_data_config_fast_decode_and_stream(large_jpeg):
    assert DataConfig().fast_decode is False
    with pytest.raises(ValueError, match="data.fast_decode"):
        DataConfig(fast_decode="yes")
    doc = {"id": "s0", "messages": [
        {"role": "user", "content": [{"type": "image", "name": "img0.jpg"}, {"type": "text", "text": "Where?"}]},
        {"role": "assistant", "content": [{"type": "box", "ref": "it", "box": [160, 120, 800, 600], "image": "img0.jpg"}]},
    ]}
    members = {"json": json.dumps(doc).encode(), "img0.jpg": large_jpeg}
    tok = get_tokenizer()
    built = {}
    for fast in (False, True):
        cfg = DataConfig(generation="qwen2_5_vl", max_tokens=4096, max_pixels=MAX_PIXELS, fast_decode=fast)
        built[fast] = SampleBuilder(cfg, tok).build(members)
    a, b = built[False], built[True]
    # same grid and tokens: the box is rendered in resized-image pixels from the source size
    assert a["grids"] == b["grids"] == [(1, 26, 36)] and a["input_ids"] == b["input_ids"]
    assert '"bbox_2d": [50, 36, 252, 182]' in tok.decode(a["input_ids"])
    lut = norm_lut(tuple(SPEC.mean), tuple(SPEC.std))  # the loader ships uint8 codes: compare normalised values
    diff = np.abs(apply_lut(a["pixel_codes"][0], lut) - apply_lut(b["pixel_codes"][0], lut))
    assert 0 < diff.max() < FAST_MAX_DIFF
