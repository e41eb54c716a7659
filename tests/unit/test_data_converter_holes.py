"""make_shards (issue 14): an exception on one line is a rejection, invalid UTF-8 is `bad_utf8`, videos
get the images' pixel cap per frame and a frames × pixels cap, from the header, before any decoding."""

import json
import os
import shutil

import pytest

import data_pipelines.make_shards as ms
from data_pipelines.make_shards import make_shards
from data_pipelines.shards import read_index
from data_pipelines.video import VideoTooLarge, probe_video

CLIP = os.path.join(os.path.dirname(__file__), "..", "fixtures", "video", "moving_64x48_4fps.mp4")  # 8 frames of 64x48


def _conv(human: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": "ok"}]


def _convert(tmp_path, lines: list[bytes], **kw) -> dict:
    shutil.copy(CLIP, tmp_path / "clip.mp4")
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return make_shards("qwen-finetune", str(tmp_path / "in.jsonl"), str(tmp_path), str(tmp_path / "out"),
                       progress=False, **kw)


def _reasons(report: dict) -> dict[str, str]:
    return {r["record"]: r["reason"] for r in report["rejections"]}


def test_broken_lines_are_rejected_with_reasons_and_the_rest_converted(tmp_path):
    good = json.dumps({"id": "good", "conversations": _conv("hello")}).encode()
    nested = b'{"id": "deep", "conversations": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    latin1 = json.dumps({"id": "latin", "conversations": _conv("caf\u00e9")}, ensure_ascii=False).encode("latin-1")
    surrogate = b'{"id": "surr", "conversations": [{"from": "human", "value": "x\\ud800"}, {"from": "gpt", "value": "y"}]}'
    deep_value = json.dumps({"id": "deepval", "conversations": [{"from": "human", "value": [[[[["x"]]]]]},
                                                                 {"from": "gpt", "value": "ok"}]}).encode()
    report = _convert(tmp_path, [good, nested, latin1, surrogate, deep_value])
    reasons = _reasons(report)
    assert reasons == {"line 2": "bad_json_line", "line 3": "bad_utf8", "id=surr (line 4)": "bad_utf8",
                       "id=deepval (line 5)": "bad_record"}, report["rejections"]
    detail = {r["record"]: r["detail"] for r in report["rejections"]}
    assert "RecursionError" in detail["line 2"] and "utf-8" in detail["line 3"]
    assert report["written"] == 1 and report["records"] == 5
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["rejected_by_reason"] == {"bad_json_line": 1, "bad_record": 1, "bad_utf8": 2}
    assert [s["id"] for sh in read_index(str(tmp_path / "out"))["shards"] for s in sh["samples"]] == ["good"]


def test_video_pixel_caps_are_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError("a video over the caps was decoded")

    line = json.dumps({"id": "v", "video": "clip.mp4", "conversations": _conv("<video>what moves?")}).encode()
    monkeypatch.setattr(ms, "decode_frames", no_decoding)
    (tmp_path / "frame").mkdir()
    frame = _convert(tmp_path / "frame", [line], max_source_pixels=64 * 48 - 1)  # the images' cap, applied to frames
    assert _reasons(frame) == {"id=v (line 1)": "video_pixel_limit"}
    assert "64x48 = 3072 pixels > 3071" in frame["rejections"][0]["detail"]
    monkeypatch.setattr(ms, "MAX_VIDEO_TOTAL_PIXELS", 8 * 64 * 48 - 1)  # frames x pixels, one pixel too many
    (tmp_path / "total").mkdir()
    total = _convert(tmp_path / "total", [line])
    assert _reasons(total) == {"id=v (line 1)": "video_pixel_limit"}
    assert "8 frames of 64x48" in total["rejections"][0]["detail"]
    monkeypatch.undo()
    (tmp_path / "ok").mkdir()
    assert _convert(tmp_path / "ok", [line])["written"] == 1  # within the caps: converted


def test_training_side_refuses_oversized_videos_before_decoding():
    blob = open(CLIP, "rb").read()
    assert probe_video(blob).total_frames == 8
    with pytest.raises(VideoTooLarge, match="pixel cap of images"):
        probe_video(blob, max_frame_pixels=1000)
    with pytest.raises(VideoTooLarge, match="in all"):
        probe_video(blob, max_total_pixels=1000 * 8)
