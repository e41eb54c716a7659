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
    ]
    report, out = _run(tmp_path, "qwen-finetune", recs, media, bad_lines=['{"id": "broken", "image": '])
    by = {r["record"].split(" (")[0]: r["reason"] for r in report["rejections"]}
    assert by == {
        "id=missing": "missing_file", "id=trunc": "undecodable_image", "id=notimg": "undecodable_image",
        "id=bomb": "pixel_limit", "id=strip": "aspect_ratio", "id=manytags": "too_many_tags",
        "id=fewtags": "too_few_tags", "id=notags": "too_few_tags", "id=empty": "empty_conversation",
        "id=noanswer": "empty_conversation", "id=badrole": "bad_record", "id=emptyvideo": "unreadable_video",
        "id=video": "unreadable_video", "id=missingvideo": "missing_file", "id=good1": "duplicate_id",
        "line 20": "bad_json_line",
    }
    assert report["written"] == 4 and report["records"] == 20 == report["written"] + report["rejected"]
    assert set(by.values()) == set(REASONS)  # every reason exercised
    on_disk = json.load(open(os.path.join(out, "report.json")))
    assert on_disk["rejected"] == 16 and on_disk["rejected_by_reason"]["too_few_tags"] == 2

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
