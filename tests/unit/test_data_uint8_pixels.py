"""The loader ships pixels as uint8 codes; normalised where the batch lives they equal HF's pixel_values.

SampleBuilder → pack gives `PackedBatch.pixel_values` uint8 [P, C·T·p·p] plus `pixel_lut`; `to(device)`
(here "cpu") normalises them. Checked bit for bit against transformers' image processor for every
patch-based generation, against the golden HF video fixtures, on a batch mixing images and videos
(each row takes its medium's table), and for Qwen-VL's fixed 448² path.
"""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

import data_pipelines.schema as schema
from data_pipelines.schema import DataConfig
from data_pipelines.stream import SampleBuilder, pack
from data_pipelines.text import get_tokenizer
from data_pipelines.vision import preprocess_image, preprocess_qwen_vl, vision_spec

VIDEOS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "video")
SIZES = [(300, 200), (97, 311)]  # (w, h): an upscale and a downscale under the small pixel budget below


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 17 + yy / 23), 128 + 100 * np.cos(yy / 13), 128 + 90 * np.sin((xx + yy) / 31)], -1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _sample(sid: str, media: dict[str, bytes]) -> dict[str, bytes]:
    parts = [{"type": "video" if name.endswith(".mp4") else "image", "name": name} for name in media]
    doc = {"id": sid, "messages": [
        {"role": "user", "content": parts + [{"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Colours."}]},
    ]}
    return {"json": json.dumps(doc).encode(), **media}


def _cfg(generation: str, **kw) -> DataConfig:
    spec = vision_spec(generation)
    p2 = (spec.patch_size * spec.merge_size) ** 2
    return DataConfig(generation=generation, max_tokens=4096, patch_size=spec.patch_size, merge_size=spec.merge_size,
                      min_pixels=p2 * 4, max_pixels=p2 * 48, **kw)


def _hf(cfg: DataConfig, blob: bytes) -> np.ndarray:
    spec = vision_spec(cfg.generation)
    hf = Qwen2VLImageProcessor(
        image_mean=list(spec.mean), image_std=list(spec.std), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
        patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
    )
    return hf(images=[Image.open(io.BytesIO(blob))], return_tensors="np")["pixel_values"]


def _fixture(case: str) -> tuple[dict, bytes, np.ndarray]:
    rec = json.load(open(os.path.join(VIDEOS, "golden.json")))[case]
    assert rec["pixels"] == "float32"  # HF's own floats, stored as they came
    with open(os.path.join(VIDEOS, rec["video"]), "rb") as f:
        return rec, f.read(), np.load(os.path.join(VIDEOS, "golden.npz"))[case]


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_loader_codes_normalised_equal_hf_images(generation):
    cfg = _cfg(generation)
    builder = SampleBuilder(cfg, get_tokenizer())
    blobs = {f"img{i}.jpg": _jpeg(w, h, seed=i) for i, (w, h) in enumerate(SIZES)}
    batch = pack(cfg, [builder.build(_sample("s0", blobs))])
    assert batch.pixel_values.dtype == torch.uint8
    got = batch.to("cpu").pixel_values
    want = np.concatenate([_hf(cfg, b) for b in blobs.values()])
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    # the public float API gives the same numbers
    public = [preprocess_image(Image.open(io.BytesIO(b)), generation, cfg.min_pixels, cfg.max_pixels)[0] for b in blobs.values()]
    assert torch.equal(torch.cat(public), got)


@pytest.mark.parametrize("case", ["q2_moving", "q3_moving"])
def test_loader_codes_normalised_equal_hf_video_in_a_mixed_batch(case, monkeypatch):
    """A video (T distinct frames) next to images, in one sample and in the next: every row is normalised with
    its own medium's table, also when a gather chunk spans an image and a video."""
    rec, video, hf_video = _fixture(case)
    cfg = _cfg(rec["generation"], video_min_pixels=rec["kwargs"]["min_pixels"])
    builder = SampleBuilder(cfg, get_tokenizer())
    image, other = _jpeg(*SIZES[0], seed=5), _jpeg(*SIZES[1], seed=6)
    batch = pack(cfg, [builder.build(_sample("a", {"img.jpg": image, "clip.mp4": video})),
                       builder.build(_sample("b", {"img.jpg": other}))])
    assert batch.media_kind.tolist() == [0, 1, 0] and batch.grid_thw[1].tolist() == rec["grid_thw"]
    monkeypatch.setattr(schema, "ROWS_PER_GATHER", 7)  # chunks that straddle the media boundaries
    got = batch.to("cpu").pixel_values.numpy()
    want = np.concatenate([_hf(cfg, image), hf_video, _hf(cfg, other)])
    assert np.array_equal(got, want)


def test_qwen_vl_codes_normalised_equal_the_float_path():
    cfg = DataConfig(generation="qwen_vl", max_tokens=1024)
    blob = _jpeg(*SIZES[0], seed=7)
    batch = pack(cfg, [SampleBuilder(cfg, get_tokenizer()).build(_sample("q", {"img.jpg": blob}))])
    assert batch.pixel_values.dtype == torch.uint8 and batch.pixel_values.shape == (1024, 588)
    want, _ = preprocess_qwen_vl(Image.open(io.BytesIO(blob)))  # tested against the released transform
    assert np.array_equal(batch.to("cpu").pixel_values.numpy(), want)
