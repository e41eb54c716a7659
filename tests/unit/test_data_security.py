"""Issue 14 part A: an index cannot name paths or shell syntax; unreadable data is counted, named and listed."""

import json
import os
import shutil

import pytest

from data_pipelines.inspect import inspect
from data_pipelines.schema import DataConfig, DataSource
from data_pipelines.shards import validate_index
from data_pipelines.sources import resolve_source, shard_url
from data_pipelines.stream import StepLoader
from data_pipelines.synth import generate

INJECTION = "shard-000000.tar; id > pwned.txt; true"
BAD_NAMES = [INJECTION, "../../secret/x.tar", "/etc/x.tar", "sub/x.tar", "a b.tar", "x.tar\n", "x$(id).tar",
             "x`id`.tar", "x'.tar", "..tar", ".hidden.tar", "-rf.tar", "x.tar.gz", "", None, 7, "é.tar", "x\x00.tar"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sec") / "good"
    generate(str(d), 60, seed=3, samples_per_shard=20, min_side=56, max_side=112)
    return str(d)


def _copy_with_name(src: str, dst: str, name) -> str:
    shutil.copytree(src, dst)
    index = json.load(open(os.path.join(dst, "index.json")))
    index["shards"][1]["name"] = name
    json.dump(index, open(os.path.join(dst, "index.json"), "w"))
    return dst


@pytest.mark.parametrize("name", BAD_NAMES)
def test_index_refuses_unsafe_shard_names(name):
    index = {"version": 1, "shards": [{"name": "shard-000000.tar", "samples": []}, {"name": name, "samples": []}]}
    with pytest.raises(ValueError, match=r"where\.json: shard entry name .* is not a plain shard file name"):
        validate_index(index, "where.json")


def test_plain_names_pass_and_pipe_names_are_quoted():
    ok = {"version": 1, "shards": [{"name": n, "samples": []} for n in ("shard-000000.tar", "my_data.v2-0001.tar")]}
    assert validate_index(ok, "x") is ok
    assert shard_url("pipe:aws s3 cp s3://b/d/{shard} -", "a.tar") == "pipe:aws s3 cp s3://b/d/a.tar -"
    assert shard_url("https://h/d/{shard}", "a.tar") == "https://h/d/a.tar"
    with pytest.raises(ValueError, match="not a plain shard file name"):
        shard_url("pipe:cat {shard}", INJECTION)


@pytest.mark.parametrize("name", [INJECTION, "../../secret/x.tar"])
def test_pipe_source_with_hostile_index_refused_before_any_command(tmp_path, synth_dir, name):
    bad = _copy_with_name(synth_dir, str(tmp_path / "bad"), name)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # where `id > pwned.txt` would write
    try:
        with pytest.raises(ValueError, match="is not a plain shard file name") as err:
            resolve_source(f"pipe:cat {bad}/{{shard}}")
        assert "index.json" in str(err.value) and repr(name) in str(err.value)
        with pytest.raises(ValueError, match="is not a plain shard file name"):
            resolve_source(bad)  # a local directory: no path outside it
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "pwned.txt").exists()
    with pytest.raises(SystemExit, match="is not a plain shard file name"):
        inspect(bad)
    with pytest.raises(SystemExit, match="is not a plain shard file name"):
        inspect(os.path.join(bad, "shard-000000.tar"))


def _without(src: str, dst: str, *names: str) -> str:
    """A copy of shard directory `src` at `dst` with the shard files `names` (default: all) deleted."""
    shutil.copytree(src, dst)
    for name in names or [n for n in os.listdir(dst) if n.endswith(".tar")]:
        os.remove(os.path.join(dst, name))
    return dst


def _loader(path: str, **kw) -> StepLoader:
    cfg = DataConfig(sources=[DataSource(path=path)], max_tokens=1024, **kw)
    return StepLoader(cfg, micro_batches_per_step=2, dp_rank=0, dp_size=1)


def test_unreadable_and_truncated_shards_are_named_counted_and_listed(tmp_path, synth_dir, caplog):
    bad = _without(synth_dir, str(tmp_path / "bad"), "shard-000000.tar")  # unreadable: every sample a shard_error
    index = json.load(open(os.path.join(bad, "index.json")))
    sh = index["shards"][2]  # damaged mid-file, and read by streaming (no offsets in its index entry)
    cut = min(min(o for o, _ in s["members"].values()) for s in sh["samples"][10:]) - 512  # sample 10's first header
    for s in sh["samples"]:
        s.pop("members"), s.pop("offset", None)
    json.dump(index, open(os.path.join(bad, "index.json"), "w"))
    blob = open(os.path.join(synth_dir, "shard-000002.tar"), "rb").read()
    open(os.path.join(bad, "shard-000002.tar"), "wb").write(blob[:cut] + b"\x07" * 512 + blob[cut + 512:])
    ld = _loader(bad, max_bad_fraction=0.9, bad_window=100)
    ld.log_skips(str(tmp_path / "out" / "data_skipped.jsonl"))
    with caplog.at_level("WARNING", logger="data_pipelines.stream"):
        seen = sum(sum(b.num_samples for b in ld.next_step()) for _ in range(6))
    ld.close()
    st = ld.stats()
    assert st["data_skipped/shard_error"] >= 20  # all of shard 0 (one epoch is 60 samples)
    lines = [json.loads(x) for x in (tmp_path / "out" / "data_skipped.jsonl").read_text().splitlines()]
    assert len(lines) == st["data_skipped"] and seen + len(lines) >= 60
    assert all(x["id"] and x["key"] and x["reason"] for x in lines)
    errs = [x for x in lines if x["reason"] == "shard_error" and x["shard"] == "shard-000000.tar"]
    assert errs and "shard-000000.tar" in errs[0]["detail"] and "No such file" in errs[0]["detail"], errs[:1]
    damaged = {x["key"] for x in lines if x["shard"] == "shard-000002.tar"}  # after the damage: skipped with a reason
    assert damaged == {s["key"] for s in sh["samples"][10:]}, damaged
    assert all(x["reason"] == "shard_error" and "ends before samples" in x["detail"] for x in lines if x["shard"] == "shard-000002.tar")
    named = [r.getMessage() for r in caplog.records if "could not read shard shard-000000.tar" in r.getMessage()]
    assert len(named) == 1, named  # once per shard, however many steps touch it


def test_bad_fraction_applies_from_the_first_samples(tmp_path, synth_dir):
    bad = _without(synth_dir, str(tmp_path / "gone"))
    ld = _loader(bad)  # defaults: 1% of a 1000-sample window = 10 bad samples allowed
    with pytest.raises(RuntimeError, match=r"11 of the last 11 samples .* data.max_bad_fraction=0.01 of "
                       r"data.bad_window=1000.*shard_error.*shard-00000"):
        for _ in range(20):
            ld.next_step()
    ld.close()


def test_empty_step_reports_its_skips(tmp_path, synth_dir):
    bad = _without(synth_dir, str(tmp_path / "gone"))
    ld = _loader(bad, max_bad_fraction=1.0)
    batches = ld.next_step()
    assert sum(b.num_samples for b in batches) == 0
    skips = ld.last_step_skips()
    assert skips["count"] > 0 and skips["reasons"] == {"shard_error": skips["count"]}
    assert skips["shards"] and all(s.startswith("shard-0000") for s in skips["shards"])
    ld.close()


def test_skip_list_is_capped(tmp_path, synth_dir, monkeypatch):
    import data_pipelines.stream as stream

    monkeypatch.setattr(stream, "SKIP_LOG_MAX_LINES", 3)
    bad = _without(synth_dir, str(tmp_path / "gone"), "shard-000000.tar", "shard-000001.tar")
    ld = _loader(bad, max_bad_fraction=1.0)
    path = tmp_path / "data_skipped.jsonl"
    ld.log_skips(str(path))
    for _ in range(4):
        ld.next_step()
    ld.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 4 and ld.stats()["data_skipped"] > 4
    assert lines[-1]["truncated"] is True and "cut at 3 lines" in lines[-1]["message"]
