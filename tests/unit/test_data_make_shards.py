"""make_shards: every input format, every rejection reason, workers, the CLI and its report."""

import io
import json
import os

import pytest
from PIL import Image

from data_pipelines.make_shards import REASONS, main, make_shards
from data_pipelines.schema import DataConfig, DataSource
from data_pipelines.shards import read_index
from data_pipelines.stream import StepLoader, read_shard_members


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (64, 48), (200, 10, 10)).save(d / "a.png")
    Image.new("RGB", (80, 60), (10, 200, 10)).save(d / "b.jpg", quality=90)
    Image.new("CMYK", (40, 50), (10, 20, 30, 40)).save(d / "cmyk.jpg")
    Image.new("RGB", (300, 300), (1, 2, 3)).save(d / "big.png")  # over the test's pixel limit
    Image.new("RGB", (1, 300)).save(d / "strip.png")  # aspect 300 > 200
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (5, 5, 5)).save(buf, format="PNG")
    (d / "trunc.png").write_bytes(buf.getvalue()[:50])
    (d / "notimg.png").write_bytes(b"this is not an image")
    (d / "empty.mp4").write_bytes(b"")
    (d / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)  # header only: unreadable
    return str(d)


def _conv(human, gpt="ok"):
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def _run(tmp_path, fmt, records, media, *, jsonl=True, bad_lines=(), **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    inp = tmp_path / ("in.jsonl" if jsonl else "in.json")
    if jsonl:
        lines = [json.dumps(r) for r in records] + list(bad_lines)
        inp.write_text("\n".join(lines) + "\n")
    else:
        inp.write_text(json.dumps(records))
    out = tmp_path / "out"
    kw.setdefault("max_source_pixels", 50_000)
    report = make_shards(fmt, str(inp), media, str(out), progress=False, **kw)
    return report, str(out)


def _members(out):
    idx = read_index(out)
    found = {}
    for sh in idx["shards"]:
        keys = {s["key"] for s in sh["samples"]}
        got, err = read_shard_members(os.path.join(out, sh["name"]), keys)
        assert err is None
        for s in sh["samples"]:
            found[s["id"]] = (json.loads(got[s["key"]]["json"]), s, got[s["key"]])
    return found


def test_qwen_finetune_every_rejection_reason(tmp_path, media):
    recs = [
        {"id": "good1", "image": "a.png", "conversations": _conv("<image>\nWhat colour?", "red")},
        {"id": "good2", "image": ["a.png", "b.jpg"], "conversations": _conv("<image><image>Compare.", "same")},
        {"id": "cmyk", "image": "cmyk.jpg", "conversations": _conv("<image>\nDescribe.", "flat")},
        {"conversations": _conv("Hi", "Hello")},  # text-only, no id: named by line
        {"id": "missing", "image": "nope.png", "conversations": _conv("<image>x")},
        {"id": "trunc", "image": "trunc.png", "conversations": _conv("<image>x")},
        {"id": "notimg", "image": "notimg.png", "conversations": _conv("<image>x")},
        {"id": "bomb", "image": "big.png", "conversations": _conv("<image>x")},
        {"id": "strip", "image": "strip.png", "conversations": _conv("<image>x")},
        {"id": "manytags", "image": "a.png", "conversations": _conv("<image><image>x")},
        {"id": "fewtags", "image": ["a.png", "b.jpg"], "conversations": _conv("<image>x")},
        {"id": "notags", "image": "a.png", "conversations": _conv("x")},
        {"id": "empty", "image": [], "conversations": []},
        {"id": "noanswer", "conversations": [{"from": "human", "value": "question?"}]},
        {"id": "badrole", "conversations": [{"from": "robot", "value": "x"}]},
        {"id": "emptyvideo", "video": "empty.mp4", "conversations": _conv("<video>x")},
        {"id": "video", "video": "clip.mp4", "conversations": _conv("<video>x")},
        {"id": "missingvideo", "video": "gone.mp4", "conversations": _conv("<video>x")},
        {"id": "good1", "image": "a.png", "conversations": _conv("<image>again")},  # duplicate id
        {"id": "inline", "image": "a.png", "conversations": _conv("<image> and <img>b.jpg")},  # unclosed span
        {"id": "outside", "image": "../a.png", "conversations": _conv("<image>x")},
        {"id": "badbox", "conversations": [{"from": "user", "value": "<img>a.png</img>where?"},
                                           {"from": "assistant", "value": "<box>(1,2)</box>"}]},
    ]
    report, out = _run(tmp_path, "qwen-finetune", recs, media, bad_lines=['{"id": "broken", "image": '])
    by = {r["record"].split(" (")[0]: r["reason"] for r in report["rejections"]}
    assert by == {
        "id=missing": "missing_file", "id=trunc": "undecodable_image", "id=notimg": "undecodable_image",
        "id=bomb": "pixel_limit", "id=strip": "aspect_ratio", "id=manytags": "too_many_tags",
        "id=fewtags": "too_few_tags", "id=notags": "too_few_tags", "id=empty": "empty_conversation",
        "id=noanswer": "empty_conversation", "id=badrole": "bad_record", "id=emptyvideo": "unreadable_video",
        "id=video": "unreadable_video", "id=missingvideo": "missing_file", "id=good1": "duplicate_id",
        "id=inline": "inline_image", "id=outside": "outside_root", "id=badbox": "bad_box", "line 23": "bad_json_line",
    }
    assert report["written"] == 4 and report["records"] == 23 == report["written"] + report["rejected"]
    assert set(by.values()) == set(REASONS) - {"bad_utf8", "video_pixel_limit"}  # these: test_data_converter_holes.py
    on_disk = json.load(open(os.path.join(out, "report.json")))
    assert on_disk["rejected"] == 19 and on_disk["rejected_by_reason"]["too_few_tags"] == 2

    samples = _members(out)
    assert set(samples) == {"good1", "good2", "cmyk", "in-4"}
    doc, entry, members = samples["good2"]
    assert doc["messages"][0]["content"] == [
        {"type": "image", "name": "img0.png"}, {"type": "image", "name": "img1.jpg"}, {"type": "text", "text": "Compare."}]
    assert entry["images"] == [[48, 64], [60, 80]]
    assert members["img1.jpg"] == open(os.path.join(media, "b.jpg"), "rb").read()  # original bytes kept
    doc, _, _ = samples["good1"]
    assert doc["messages"] == [
        {"role": "user", "content": [{"type": "image", "name": "img0.png"}, {"type": "text", "text": "\nWhat colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]


def test_llava_json_and_workers_give_identical_shards(tmp_path, media):
    recs = [{"id": f"l{i}", "image": "a.png" if i % 2 else "b.jpg",
             "conversations": _conv("<image>\nWhat is this?", f"thing {i}")} for i in range(12)]
    recs.append({"id": "t", "conversations": _conv("plain question", "plain answer")})
    recs.append({"id": "bad", "image": "nope.jpg", "conversations": _conv("<image>")})
    r1, out1 = _run(tmp_path / "w1", "llava", recs, media, jsonl=False, samples_per_shard=5, workers=1)
    r2, out2 = _run(tmp_path / "w2", "llava", recs, media, jsonl=False, samples_per_shard=5, workers=2)
    assert r1["written"] == r2["written"] == 13 and r1["shards"] == r2["shards"] and len(r1["shards"]) == 3
    assert [r["record"] for r in r1["rejections"]] == ["id=bad (index 13)"]
    for name in r1["shards"] + ["index.json"]:
        assert open(os.path.join(out1, name), "rb").read() == open(os.path.join(out2, name), "rb").read()
    # the stream trains on what was converted
    loader = StepLoader(DataConfig(sources=[DataSource(path=out1)], max_tokens=512), micro_batches_per_step=2,
                        dp_rank=0, dp_size=1)
    batches = loader.next_step()
    assert sum(b.num_samples for b in batches) > 0 and loader.stats()["data_skipped"] == 0


def test_interleaved_documents(tmp_path, media):
    recs = [
        {"id": "doc1", "texts": ["Intro text.", None, "After the image.", None], "images": [None, "a.png", None, "b.jpg"]},
        {"id": "doc2", "texts": [None, None], "images": [None, "a.png"]},  # both null at 0
        {"id": "doc3", "texts": [None], "images": ["a.png"]},  # no text
        {"id": "doc4", "texts": ["x"], "images": [None, None]},  # misaligned
        {"id": "doc5", "texts": ["Only text here."], "images": [None]},
    ]
    report, out = _run(tmp_path, "interleaved", recs, media)
    assert {r["record"].split(" (")[0]: r["reason"] for r in report["rejections"]} == {
        "id=doc2": "bad_record", "id=doc3": "empty_conversation", "id=doc4": "bad_record"}
    samples = _members(out)
    doc, entry, _ = samples["doc1"]
    assert doc["messages"] == [{"role": "assistant", "content": [
        {"type": "text", "text": "Intro text."}, {"type": "image", "name": "img0.png"},
        {"type": "text", "text": "After the image."}, {"type": "image", "name": "img1.jpg"}]}]
    # all document text is trained; images and the default system turn are not
    from data_pipelines.schema import IGNORE_INDEX
    from data_pipelines.text import get_tokenizer

    tok = get_tokenizer()
    ids, labels = tok.encode_conversation(doc["messages"], [3, 3])
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == "Intro text.After the image.<|im_end|>"


def test_cli_summary_and_errors(tmp_path, media, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "x", "image": "nope.png", "conversations": _conv("<image>q")}) + "\nnot json\n")
    rc = main(["--format", "qwen-finetune", "--input", str(inp), "--media-root", media, "--out", str(tmp_path / "o"),
               "--no-progress"])
    out = capsys.readouterr()
    assert rc == 1 and "no record could be converted" in out.err
    assert "rejected id=x (line 1): missing file" in out.out and "rejected line 2: bad JSON line" in out.out
    with pytest.raises(SystemExit, match="must end in .json"):
        main(["--format", "llava", "--input", str(media) + "/a.png", "--media-root", media, "--out", str(tmp_path / "p")])
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    with pytest.raises(SystemExit, match="use .jsonl"):
        make_shards("llava", str(bad), media, str(tmp_path / "q"), progress=False)


def test_reasoning_passes_through(tmp_path, media):
    records = [
        {"id": "tagged", "image": "a.png", "conversations": _conv("<image>\nWhich colour?", "<think>\nIt is red.\n</think>\n\nred")},
        {"id": "field", "conversations": [{"from": "human", "value": "2+2?"},
                                          {"from": "gpt", "value": "4", "reasoning_content": "2 plus 2 is 4."}]},
        {"id": "plain", "conversations": _conv("hi", "a </b> is fine")},
        {"id": "human_reasoning", "conversations": [{"from": "human", "value": "q", "reasoning": "no"},
                                                    {"from": "gpt", "value": "a"}]},
        {"id": "bad_type", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "reasoning": 3}]},
    ]
    for fmt in ("qwen-finetune", "llava"):
        report, out = _run(tmp_path / fmt, fmt, records, media)
        assert {r["record"].split(" (")[0]: r["reason"] for r in report["rejections"]} == {
            "id=human_reasoning": "bad_record", "id=bad_type": "bad_record"}
        samples = _members(out)
        assert samples["tagged"][0]["messages"][1] == {
            "role": "assistant", "reasoning": "It is red.", "content": [{"type": "text", "text": "red"}]}
        assert samples["field"][0]["messages"][1]["reasoning"] == "2 plus 2 is 4."
        assert "reasoning" not in samples["plain"][0]["messages"][1]
    cfg = DataConfig(sources=[DataSource(path=out)], max_tokens=256, generation="qwen3_vl", shuffle=False)
    loader = StepLoader(cfg, micro_batches_per_step=2, dp_rank=0, dp_size=1)
    batches = loader.next_step()  # the tiny set repeats over epochs
    ids = [i for b in batches for i in b.sample_ids]
    assert {"tagged", "field"} <= set(ids) and loader.stats()["data_skipped"] == 0
    # one <think> per thinking sample
    assert sum(int((b.input_ids == 151667).sum()) for b in batches) == ids.count("tagged") + ids.count("field")


# --------------------------------------------------------------------- Qwen-VL (v1) finetune format
def _qwen_vl_data(tmp_path):
    """A Qwen-VL finetune.py JSON next to its images (paths relative to the JSON's folder)."""
    (tmp_path / "imgs").mkdir(parents=True)
    Image.new("RGB", (640, 480), (220, 20, 20)).save(tmp_path / "imgs" / "red.jpg", quality=90)
    Image.new("RGB", (300, 200), (20, 20, 220)).save(tmp_path / "imgs" / "blue.png")
    records = [
        {"id": "identity_0", "conversations": [
            {"from": "user", "value": "Picture 1: <img>imgs/red.jpg</img>\nWhat colour is it?"},
            {"from": "assistant", "value": "Red."}]},
        {"id": "identity_1", "conversations": [
            {"from": "user", "value": "Picture 1: <img>imgs/red.jpg</img>\nPicture 2: <img>imgs/blue.png</img>\n"
                                      "Where is <ref>the blue area</ref>?"},
            {"from": "assistant", "value": "<ref>the blue area</ref><box>(100,250),(999,1000)</box> and "
                                           "<box>(0,0),(3,7)</box>"}]},
        {"id": "identity_2", "conversations": [{"from": "user", "value": "Hello"},
                                               {"from": "assistant", "value": "Hi!"}]},
    ]
    inp = tmp_path / "train.json"
    inp.write_text(json.dumps(records))
    return inp


def test_qwen_vl_v1_inline_images_and_grounding(tmp_path):
    from data_pipelines.inspect import inspect
    from data_pipelines.stream import SampleBuilder
    from data_pipelines.text import get_tokenizer

    inp = _qwen_vl_data(tmp_path)
    report = make_shards("qwen-finetune", str(inp), None, str(tmp_path / "out"), progress=False)  # root: JSON's folder
    assert report["written"] == 3 and report["rejected"] == 0
    samples = _members(str(tmp_path / "out"))
    doc, entry, members = samples["identity_0"]
    assert doc["messages"][0]["content"] == [
        {"type": "text", "text": "Picture 1: "}, {"type": "image", "name": "img0.jpg"},
        {"type": "text", "text": "\nWhat colour is it?"}]
    assert members["img0.jpg"] == (tmp_path / "imgs" / "red.jpg").read_bytes() and entry["images"] == [[480, 640]]
    doc, entry, members = samples["identity_1"]
    assert entry["images"] == [[480, 640], [200, 300]] and set(members) >= {"img0.jpg", "img1.png"}
    user, answer = doc["messages"][0]["content"], doc["messages"][1]["content"]
    assert [p["type"] for p in user] == ["text", "image", "text", "image", "text", "text", "text"]
    assert user[-2:] == [{"type": "text", "text": "the blue area"}, {"type": "text", "text": "?"}]  # lone <ref>: text
    box1, _, box2 = answer  # a box refers to the latest image before it (Picture 2: 300x200), in its pixels
    assert box1["type"] == "box" and box1["ref"] == "the blue area" and box1["image"] == "img1.png"
    assert box1["box"] == pytest.approx([30.0, 50.0, 299.7, 200.0]) and box2["ref"] == ""
    assert answer[1] == {"type": "text", "text": " and "}

    tok = get_tokenizer()
    members = samples["identity_1"][2]
    # Qwen-VL renders its own image tokens at the span and gives the original box numbers back
    s = SampleBuilder(DataConfig(generation="qwen_vl", patch_size=14, temporal_patch_size=1, merge_size=1,
                                 min_pixels=448 * 448, max_pixels=448 * 448), tok).build(members)
    text = tok.decode(s["input_ids"])
    assert text.count("<img>") == 2 and text.count("<imgpad>") == 512 and "imgs/" not in text
    assert "Picture 1: <img>" in text and "</img>\nPicture 2: <img>" in text
    assert "<ref>the blue area</ref><box>(100,250),(999,999)</box> and <ref></ref><box>(0,0),(3,7)</box>" in text
    # Qwen2-VL: its own image and grounding tokens, the same numbers on [0, 1000)
    s = SampleBuilder(DataConfig(generation="qwen2_vl", max_pixels=50176), tok).build(members)
    text = tok.decode(s["input_ids"])
    assert text.count("<|vision_start|>") == 2 and s["visual_tokens"] > 0
    assert "<|object_ref_start|>the blue area<|object_ref_end|><|box_start|>(100,250),(999,999)<|box_end|>" in text
    # inspect sees the images (it used to print "visual 0")
    out = inspect(str(tmp_path / "out"), "qwen_vl", n=3)
    assert "visual 256" in out and "visual 512" in out and "image 1: 300x200 px" in out


def test_inline_image_references_are_rejected_in_every_format(tmp_path, media):
    cases = {
        "qwen-finetune": [
            {"id": "unclosed", "conversations": _conv("Picture 1: <img>a.png\nWhat?")},
            {"id": "html", "image": "a.png", "conversations": _conv('<image>\nlike <img src="b.jpg">?')},
            {"id": "upper", "image": "a.png", "conversations": _conv("<image> and <IMAGE>")},
            {"id": "empty", "conversations": _conv("<img></img> what?")},
            {"id": "in_reasoning", "image": "a.png",
             "conversations": _conv("<image>q", "<think>see <img>b.jpg</img></think>red")},
            {"id": "ok", "image": "a.png", "conversations": _conv("<image>What is an <imgur> link?")},
        ],
        "llava": [
            {"id": "span", "conversations": _conv("Picture 1: <img>a.png</img>\nWhat?")},
            {"id": "answer", "image": "a.png", "conversations": _conv("<image>q", "it is <img>b.jpg</img>")},
            {"id": "ok", "image": "a.png", "conversations": _conv("<image>q")},
        ],
        "interleaved": [
            {"id": "leftover", "texts": ["See <image> below.", None], "images": [None, "a.png"]},
            {"id": "span", "texts": ["<img>b.jpg</img> shows it.", None], "images": [None, "a.png"]},
            {"id": "ok", "texts": ["Text.", None], "images": [None, "a.png"]},
        ],
    }
    for fmt, recs in cases.items():
        report, out = _run(tmp_path / fmt, fmt, recs, media)
        by = {r["record"].split(" (")[0]: (r["reason"], r["detail"]) for r in report["rejections"]}
        assert set(by) == {f"id={r['id']}" for r in recs if r["id"] != "ok"}, fmt
        assert {reason for reason, _ in by.values()} == {"inline_image"}, by
        assert report["written"] == 1 and "ok" in _members(out)
    assert "'<img>b.jpg</img>'" in by["id=span"][1] and "image members, not text" in by["id=span"][1]


def test_media_paths_stay_under_the_root(tmp_path, media):
    recs = [{"id": "up", "conversations": _conv("<img>../media/a.png</img>x")},
            {"id": "deep", "conversations": _conv("<img>sub/../../a.png</img>x")},
            {"id": "url", "conversations": _conv("<img>https://example.com/a.png</img>x")},
            {"id": "abs", "conversations": _conv(f"<img>{media}/a.png</img>x")},  # absolute: used as written
            {"id": "inside", "conversations": _conv("<img>./x/../a.png</img>x")}]
    report, out = _run(tmp_path, "qwen-finetune", recs, media)
    assert {r["record"].split(" (")[0]: r["reason"] for r in report["rejections"]} == {
        "id=up": "outside_root", "id=deep": "outside_root", "id=url": "missing_file"}
    assert set(_members(out)) == {"abs", "inside"}


# ------------------------------------------------------------------------------------- --overwrite
def test_out_dir_with_shards_is_refused_unless_overwrite(tmp_path, media, capsys):
    recs = [{"id": f"s{i}", "image": "a.png", "conversations": _conv("<image>q", f"a{i}")} for i in range(5)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "out"
    args = ["--format", "qwen-finetune", "--input", str(inp), "--media-root", media, "--out", str(out), "--no-progress"]
    assert main(args + ["--samples-per-shard", "2"]) == 0
    assert sorted(os.listdir(out)) == ["index.json", "report.json", "shard-000000.tar", "shard-000001.tar",
                                       "shard-000002.tar"]
    (out / "notes.txt").write_text("mine")
    (out / "shard-keep").mkdir()
    before = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".tar")}
    with pytest.raises(SystemExit, match="--overwrite") as e:
        main(args + ["--samples-per-shard", "5"])
    assert "already holds shards" in str(e.value) and "index.json" in str(e.value)
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".tar")} == before  # untouched
    capsys.readouterr()
    assert main(args + ["--samples-per-shard", "5", "--overwrite"]) == 0
    assert "removed 5 files of an earlier run" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["index.json", "notes.txt", "report.json", "shard-000000.tar", "shard-keep"]
    assert (out / "notes.txt").read_text() == "mine"
    assert [s["id"] for sh in read_index(str(out))["shards"] for s in sh["samples"]] == [f"s{i}" for i in range(5)]
    # an empty or fresh folder needs no flag; a folder with only other files neither
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.md").write_text("x")
    assert make_shards("qwen-finetune", str(inp), media, str(tmp_path / "other"), progress=False)["written"] == 5
