"""Videos through make_shards → index → planner → StepLoader, for every generation."""

import json
import os
import shutil

import pytest

pytest.importorskip("av")

from data_pipelines.make_shards import make_shards  # noqa: E402
from data_pipelines.packing import GlobalPlanner  # noqa: E402
from data_pipelines.schema import DataConfig, DataSource  # noqa: E402
from data_pipelines.shards import read_index  # noqa: E402
from data_pipelines.stream import StepLoader, read_shard_members  # noqa: E402
from data_pipelines.text import VIDEO_PAD_ID, VISION_START_ID  # noqa: E402
from data_pipelines.video import VideoMeta  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "video")
VIDEO = "moving_64x48_4fps.mp4"  # 8 frames, 4 fps, 64x48
GEN_SETTINGS = {
    "qwen2_vl": dict(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 64),
    "qwen2_5_vl": dict(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 64),
    "qwen3_vl": dict(patch_size=16, min_pixels=64 * 64, max_pixels=32 * 32 * 64),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("vid")
    media = d / "media"
    media.mkdir()
    shutil.copy(os.path.join(FIX, VIDEO), media / "clip.mp4")
    (media / "broken.mp4").write_bytes(open(os.path.join(FIX, VIDEO), "rb").read()[:300])
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(media / "a.png")
    recs = [
        {"id": "v1", "video": "clip.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A white square."}]},
        {"id": "v2", "image": "a.png", "video": "clip.mp4", "conversations": [
            {"from": "human", "value": "<image>Colour? Then <video>Where does it go?"},
            {"from": "gpt", "value": "Red; to the right."}]},
        {"id": "notag", "video": "clip.mp4", "conversations": [
            {"from": "human", "value": "What moves?"}, {"from": "gpt", "value": "x"}]},
        {"id": "broken", "video": "broken.mp4", "conversations": [
            {"from": "human", "value": "<video>?"}, {"from": "gpt", "value": "x"}]},
    ]
    inp = d / "in.json"
    inp.write_text(json.dumps(recs))
    report = make_shards("qwen-finetune", str(inp), str(media), str(d / "out"), progress=False)
    return report, str(d / "out")


def test_make_shards_converts_videos(shards):
    report, out = shards
    assert report["written"] == 2
    assert {r["record"].split(" (")[0]: r["reason"] for r in report["rejections"]} == {
        "id=notag": "too_few_tags", "id=broken": "unreadable_video"}
    idx = read_index(out)
    entries = {s["id"]: s for sh in idx["shards"] for s in sh["samples"]}
    assert entries["v1"]["videos"] == [[8, 4.0, 48, 64]] and entries["v1"]["images"] == []
    assert entries["v2"]["videos"] == [[8, 4.0, 48, 64]] and entries["v2"]["images"] == [[48, 64]]
    sh = idx["shards"][0]
    got, err = read_shard_members(os.path.join(out, sh["name"]), {entries["v2"]["key"]})
    assert err is None
    members = got[entries["v2"]["key"]]
    assert members["vid0.mp4"] == open(os.path.join(FIX, VIDEO), "rb").read()  # stored as it came
    doc = json.loads(members["json"])
    assert [p["type"] for p in doc["messages"][0]["content"]] == ["image", "text", "video", "text"]


@pytest.mark.parametrize("generation", sorted(GEN_SETTINGS))
def test_loader_yields_video_batches_that_agree_with_the_index(shards, generation):
    _, out = shards
    cfg = DataConfig(sources=[DataSource(path=out)], max_tokens=512, generation=generation, shuffle=False,
                     balance="none", video_min_pixels=GEN_SETTINGS[generation]["min_pixels"],
                     video_max_pixels=GEN_SETTINGS[generation]["max_pixels"],
                     patch_size=GEN_SETTINGS[generation]["patch_size"])
    loader = StepLoader(cfg, micro_batches_per_step=1, dp_rank=0, dp_size=1)
    (batch,) = loader.next_step()
    assert loader.stats()["data_skipped"] == 0
    assert batch.sample_ids[:2] == ["v1", "v2"]  # then further epochs fill the budget
    planner: GlobalPlanner = loader.planner
    refs = [(0, 0, 0), (0, 0, 1)]
    plans = [planner.video_plans(r)[0] for r in refs]
    # grids: v1's video, then v2's image and video, in token order; media_kind marks the videos
    assert batch.grid_thw.tolist()[0] == list(plans[0].grid_thw) and batch.grid_thw.tolist()[2] == list(plans[1].grid_thw)
    assert batch.media_kind.tolist()[:3] == [1, 0, 1]
    p = GEN_SETTINGS[generation]["patch_size"]
    assert batch.pixel_values.shape == (int(batch.grid_thw.prod(-1).sum()), 3 * 2 * p * p)
    n_video_pads = int((batch.input_ids == VIDEO_PAD_ID).sum())
    assert n_video_pads == int((batch.grid_thw[batch.media_kind == 1].prod(-1) // 4).sum())
    # planned cost (from the index alone) vs the real sample lengths and video tokens
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    for k, (ref, n) in enumerate(zip(refs, lengths)):
        cost = planner.cost(ref)
        assert cost >= n and (cost == n or generation == "qwen3_vl")  # Qwen3: timestamp text is an upper bound
        a = int(batch.cu_seqlens[k])
        assert int((batch.input_ids[a : a + n] == VIDEO_PAD_ID).sum()) == plans[k].token_count(2)
    vs = int((batch.input_ids[: lengths[0]] == VISION_START_ID).sum())
    t = plans[0].grid_thw[0]
    assert vs == (t if generation == "qwen3_vl" else 1)  # one block per temporal patch in Qwen3-VL
    if generation == "qwen2_5_vl":  # absolute time: 2 frames per grid at 2 fps = 1 s → t ids 0, 2, ...
        pos = batch.position_ids[:, : lengths[0]]
        vid = batch.input_ids[: lengths[0]] == VIDEO_PAD_ID
        t_ids = pos[0, vid]
        assert sorted(set((t_ids - t_ids.min()).tolist())) == [2 * k for k in range(t)]


def test_inspect_shows_videos(shards):
    from data_pipelines.inspect import inspect

    _, out = shards
    text = inspect(out, "qwen3_vl", n=1)
    assert "video 0: 8 frames at 4 fps, 64x48 px (w x h) → 4 frames of" in text
    assert "<0.2 seconds><|vision_start|><|video_pad|>×" in text and "SKIPPED" not in text


def test_planner_rejects_videos_its_settings_cannot_sample(tmp_path):
    # a 20-px-high video: fine for Qwen2-VL (resized up), under Qwen3-VL's 32-px minimum → counted, skipped
    cfg = DataConfig(sources=[DataSource(path=str(tmp_path))], generation="qwen3_vl", patch_size=16)
    idx = {"version": 1, "shards": [{"name": "shard-000000.tar", "samples": [
        {"id": "a", "key": "0", "n_text_tokens": 20, "images": [], "videos": [VideoMeta(8, 4.0, 20, 64).as_index()]},
        {"id": "b", "key": "1", "n_text_tokens": 20, "images": []}]}]}
    planner = GlobalPlanner(cfg, [idx])
    assert planner.cost((0, 0, 0)) < 0 and planner.cost((0, 0, 1)) == 20
    plan = planner.next_micro_batch()  # filled with "b" over several epochs; "a" skipped each epoch
    assert plan and all(r == (0, 0, 1) for r in plan)
    assert planner.skipped["bad_video"] == planner.epoch or planner.skipped["bad_video"] == planner.epoch + 1


def test_synth_videos_stream_without_skips(tmp_path):
    from data_pipelines.synth import generate

    out = str(tmp_path / "synth")
    summary = generate(out, 16, seed=2, samples_per_shard=8, min_side=32, max_side=80, video_fraction=0.4)
    assert 0 < summary["kinds"]["video"] < 16
    # the other samples are those of the image-only data set
    generate(str(tmp_path / "plain"), 16, seed=2, samples_per_shard=8, min_side=32, max_side=80)
    plain = {s["id"]: s for sh in read_index(str(tmp_path / "plain"))["shards"] for s in sh["samples"]}
    mixed = {s["id"]: s for sh in read_index(out)["shards"] for s in sh["samples"]}
    where = ("key", "offset", "members")  # the sample's place in its tar differs
    assert all(mixed[k] == plain[k] | {f: mixed[k][f] for f in where} for k in mixed if "videos" not in mixed[k])
    cfg = DataConfig(sources=[DataSource(path=out)], max_tokens=1024, generation="qwen3_vl", patch_size=16,
                     video_min_pixels=32 * 32 * 4, video_max_pixels=32 * 32 * 24)
    loader = StepLoader(cfg, micro_batches_per_step=2, dp_rank=0, dp_size=1)
    batches = loader.next_step()
    assert loader.stats()["data_skipped"] == 0
    assert any(b.media_kind is not None and int(b.media_kind.sum()) > 0 for b in batches)
