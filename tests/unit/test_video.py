"""Video preprocessing against golden fixtures of the transformers 4.57.6 video processors.

The fixtures (tests/fixtures/video/) were made by make_fixtures.py in a separate venv with torchvision;
see that script for how to regenerate them.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("av")

from data_pipelines.text import get_tokenizer, video_segments  # noqa: E402
from data_pipelines.video import (  # noqa: E402
    BadVideo,
    VideoSettings,
    preprocess_video,
    probe_video,
    timestamp_text,
    video_plan,
)
from data_pipelines.vision import vision_spec  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "video")
with open(os.path.join(HERE, "golden.json")) as _f:
    GOLDEN = json.load(_f)


def _hf_pixels(case: str, rec: dict, arrays) -> np.ndarray:
    """HF's pixel values: stored as float32, or rebuilt exactly from uint8 levels (make_fixtures.py)."""
    a = arrays[case]
    if rec["pixels"] == "float32":
        return a
    spec = vision_spec(rec["generation"])
    m = np.asarray(spec.mean, np.float32) * np.float32(255.0)
    sd = np.asarray(spec.std, np.float32) * np.float32(255.0)
    rows = a.reshape(a.shape[0], 3, -1).astype(np.float32)
    return ((rows - m[None, :, None]) / sd[None, :, None]).reshape(a.shape)


def _expand(text: str) -> str:
    import re

    return re.sub(r"<\|video_pad\|>\*(\d+)", lambda m: "<|video_pad|>" * int(m.group(1)), text)


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_preprocess_video_matches_hf(case):
    rec = GOLDEN[case]
    arrays = np.load(os.path.join(HERE, "golden.npz"))
    path = os.path.join(HERE, rec["video"])
    gen = rec["generation"]
    if rec["pixels"] is None:  # default pixel budgets: sampling and grid from the metadata only
        plan = video_plan(probe_video(path), gen, VideoSettings(**rec["kwargs"]))
        assert plan.frame_indices.tolist() == rec["frame_indices"]
        assert list(plan.grid_thw) == rec["grid_thw"]
        feats = None
        timestamps = plan.frame_timestamps
        grid = plan.grid_thw
    else:
        with open(path, "rb") as f:  # bytes in, as the stream passes them
            feats = preprocess_video(f.read(), gen, **rec["kwargs"])
        assert feats.frame_indices.tolist() == rec["frame_indices"]
        assert list(feats.grid_thw) == rec["grid_thw"]
        assert feats.video_fps == rec["video_fps"]
        assert feats.second_per_grid == rec["second_per_grid"]
        ref = _hf_pixels(case, rec, arrays)
        assert feats.pixel_values.shape == tuple(rec["pixel_shape"])
        np.testing.assert_allclose(feats.pixel_values.numpy(), ref, rtol=0, atol=1e-5)
        timestamps, grid = feats.frame_timestamps, feats.grid_thw
    if "frame_timestamps" in rec:
        assert timestamps == pytest.approx(rec["frame_timestamps"], abs=1e-9)

    # the text our template renders for the video equals what the HF processor expands
    tok = get_tokenizer()
    text = ""
    for seg in video_segments(gen, (grid, timestamps)):
        text += seg if isinstance(seg, str) else tok.decode(seg)
    assert text + "Describe." == _expand(rec["text"])


def test_timestamp_text_format():
    assert timestamp_text(0.25) == "<0.2 seconds>"  # Python's round-half-even formatting, as HF
    assert timestamp_text(12.75) == "<12.8 seconds>"


def test_bad_videos_raise(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    for p in (empty, junk):
        with pytest.raises(BadVideo):
            probe_video(str(p))
    with pytest.raises(BadVideo):
        preprocess_video(b"\x00" * 64, "qwen2_vl")


def test_qwen3_frames_smaller_than_factor_rejected():
    # 40x36 frames are fine; Qwen3-VL's video smart_resize refuses sides under 32 px
    from data_pipelines.video import VideoMeta

    with pytest.raises(BadVideo, match="smaller than 32"):
        video_plan(VideoMeta(8, 4.0, 20, 64), "qwen3_vl")
    plan = video_plan(VideoMeta(8, 4.0, 20, 64), "qwen2_vl")  # Qwen2-VL resizes up instead
    assert plan.grid_thw[0] == 2
