"""Exact-byte shard reads (data_pipelines/ranged.py): offsets in the index, reindex, local / HTTP / S3
range reads against servers on 127.0.0.1 (tests/range_server.py, moto), the pipe: fallback and its node-local cache, byte counts."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines import ranged, reindex
from data_pipelines.ranged import IOStats, ShardCache, coalesce
from data_pipelines.schema import DataConfig, DataSource
from data_pipelines.shards import ShardWriter, read_index, validate_index
from data_pipelines.stream import StepLoader, read_shard_members
from data_pipelines.synth import generate
from tests.range_server import RangeServer


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranged_synth")
    generate(str(d), 48, seed=5, samples_per_shard=12, min_side=56, max_side=160)
    return str(d)


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    """Samples with incompressible 96x96 images (~28 KB): the tar headers between members are ~3% of
    the bytes, so adjacent members coalesce."""
    d = str(tmp_path_factory.mktemp("ranged_noise"))
    rng = np.random.default_rng(0)
    with ShardWriter(d, samples_per_shard=16) as w:
        for i in range(32):
            img = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
            msgs = [{"role": "user", "content": [{"type": "image", "name": "img0.png"}, {"type": "text", "text": f"n{i}?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"noise {i}"}]}]
            w.add(f"noise-{i}", msgs, {"img0.png": img})
    return d


def _strip_offsets(src: str, dst: str) -> str:
    """A copy of `src` whose index has no offsets (as written before offsets existed)."""
    shutil.copytree(src, dst)
    idx = read_index(dst)
    for sh in idx["shards"]:
        sh.pop("size")
        for s in sh["samples"]:
            s.pop("offset")
            s.pop("members")
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump(idx, f)
    return dst


def _loader(path, dp_rank=0, dp_size=1, **kw):
    cfg = DataConfig(sources=[DataSource(path=path)], max_tokens=1024, plan_ahead=False, **kw)
    return StepLoader(cfg, micro_batches_per_step=4, dp_rank=dp_rank, dp_size=dp_size)


def _steps(loader, n):
    """(sample ids, input ids, pixels) per micro-batch of `n` steps, and the summed I/O stats."""
    out, io_ = [], {"data/bytes_read": 0, "data/bytes_used": 0, "data/bytes_cached": 0}
    for _ in range(n):
        for b in loader.next_step():
            out.append((b.sample_ids, b.input_ids.tolist(), b.pixel_values.sum().item()))
        for k, v in loader.io_stats().items():
            io_[k] += v
    assert loader.stats()["data_skipped"] == 0
    loader.close()
    return out, io_


# --------------------------------------------------------------------------- offsets and reindex
def test_index_offsets_point_at_the_members(synth_dir):
    idx = read_index(synth_dir)
    for sh in idx["shards"]:
        path = os.path.join(synth_dir, sh["name"])
        assert sh["size"] == os.path.getsize(path)
        blob = open(path, "rb").read()
        streamed, err = read_shard_members(path, {s["key"] for s in sh["samples"]})
        assert err is None
        for s in sh["samples"]:
            assert s["members"].keys() == streamed[s["key"]].keys()
            for ext, (off, size) in s["members"].items():
                assert blob[off : off + size] == streamed[s["key"]][ext]
            header = tarfile.TarInfo.frombuf(blob[s["offset"] : s["offset"] + 512], "utf-8", "surrogateescape")
            assert header.name == f"{s['key']}.json"


def test_coalesce_bounds_the_waste_and_covers_every_span():
    rnd = random.Random(0)
    for trial in range(200):
        spans, pos = [], 0
        for _ in range(rnd.randint(1, 30)):
            pos += rnd.choice([0, 512, 1024, rnd.randint(0, 200_000)])
            size = rnd.randint(0, 100_000)
            spans.append((pos, size))
            pos += size
        rnd.shuffle(spans)
        groups = coalesce(spans)
        read = sum(b - a for a, b, _ in groups)
        assert read <= (1 + ranged.MAX_WASTE) * sum(s for _, s in spans) + 1e-9
        assert sorted(i for _, _, m in groups for i in m) == list(range(len(spans)))
        for a, b, members in groups:
            assert all(a <= spans[i][0] and spans[i][0] + spans[i][1] <= b for i in members)
    # members 1 KB apart with 40 KB of data each merge into one request; 1 KB with 1 KB of data do not
    assert len(coalesce([(512, 40_000), (41_472, 40_000)])) == 1
    assert len(coalesce([(512, 1_000), (2_048, 1_000)])) == 2


def test_reindex_restores_offsets_and_indexes_plain_webdataset_tars(synth_dir, tmp_path, capsys):
    old = _strip_offsets(synth_dir, str(tmp_path / "old"))
    assert reindex.main([old]) == 0
    assert "offsets added" in capsys.readouterr().out
    assert read_index(old) == read_index(synth_dir)

    # plain tars written by webdataset's own TarWriter, no index.json: the index is built from them
    import webdataset as wds

    plain = tmp_path / "plain"
    plain.mkdir()
    first = read_index(synth_dir)["shards"][0]
    members, _ = read_shard_members(os.path.join(synth_dir, first["name"]), {s["key"] for s in first["samples"]})
    with wds.TarWriter(str(plain / "part-0.tar")) as tw:
        for s in first["samples"]:
            tw.write({"__key__": f"k{s['key']}", **members[s["key"]]})
        tw.write({"__key__": "broken", "json": b"{not json"})
    assert reindex.main([str(plain)]) == 0
    assert "bad_json" in capsys.readouterr().out
    built = read_index(str(plain))["shards"][0]
    assert [(s["id"], s["n_text_tokens"], s["images"]) for s in built["samples"]] == [
        (s["id"], s["n_text_tokens"], s["images"]) for s in first["samples"]]
    ids_a, _ = _steps(_loader(str(plain)), 2)
    assert sum(len(ids) for ids, _, _ in ids_a) > 0


def test_reindex_refuses_an_index_of_other_shards(synth_dir, tmp_path, capsys):
    d = _strip_offsets(synth_dir, str(tmp_path / "d"))
    idx = read_index(d)
    idx["shards"][0]["samples"][0]["key"] = "999999999"
    with open(os.path.join(d, "index.json"), "w") as f:
        json.dump(idx, f)
    assert reindex.main([d]) == 1
    assert "999999999" in capsys.readouterr().err
    assert "members" not in read_index(d)["shards"][1]["samples"][0]  # nothing written


def test_bad_offsets_are_refused_when_the_index_is_read(synth_dir):
    good = read_index(synth_dir)
    for bad, msg in ((["x", 1], "not \\[data_offset, size\\]"), ([100, 5], "not a tar data block"),
                     ([512, 10**9], "past the shard")):
        idx = json.loads(json.dumps(good))
        idx["shards"][0]["samples"][0]["members"]["json"] = bad
        with pytest.raises(ValueError, match=msg + ".*data_pipelines.reindex"):
            validate_index(idx, "index.json")


# --------------------------------------------------------------------------------- local reads
def test_ranged_local_reads_give_the_streamed_batches_with_no_amplification(noise_dir, tmp_path):
    old = _strip_offsets(noise_dir, str(tmp_path / "old"))
    for rank in range(2):
        new_b, new_io = _steps(_loader(noise_dir, rank, 2), 3)
        old_b, old_io = _steps(_loader(old, rank, 2), 3)
        assert new_b == old_b and new_io["data/bytes_used"] == old_io["data/bytes_used"] > 0
        # the member bytes, plus the tar headers between members that coalesce (<= MAX_WASTE of them)
        assert new_io["data/bytes_used"] <= new_io["data/bytes_read"] <= (1 + ranged.MAX_WASTE) * new_io["data/bytes_used"]
        assert old_io["data/bytes_read"] > 1.05 * old_io["data/bytes_used"]  # streamed: headers and other samples too


def test_stale_index_falls_back_to_streaming(noise_dir, tmp_path, caplog):
    d = str(tmp_path / "stale")
    shutil.copytree(noise_dir, d)
    with open(os.path.join(d, "shard-000000.tar"), "ab") as f:
        f.write(b"\0" * 10240)  # the shard changed after it was indexed
    caplog.set_level(logging.WARNING, logger="data_pipelines.ranged")
    got, io_ = _steps(_loader(d), 2)
    assert got == _steps(_loader(noise_dir), 2)[0]
    assert any("index is stale" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ HTTP with Range support
@pytest.fixture
def http_server(noise_dir):
    with RangeServer(noise_dir) as served:
        yield served


def test_http_range_reads_move_only_the_needed_bytes(noise_dir, http_server):
    url, handler = http_server
    local, local_io = _steps(_loader(noise_dir, 1, 2), 3)
    handler.sent = 0
    got, io_ = _steps(_loader(url, 1, 2), 3)
    index_bytes = os.path.getsize(os.path.join(noise_dir, "index.json"))
    assert got == local
    assert handler.sent - index_bytes == io_["data/bytes_read"]  # what the server sent, what we counted
    assert io_["data/bytes_used"] == local_io["data/bytes_used"]
    assert io_["data/bytes_read"] <= 1.05 * io_["data/bytes_used"]


def test_http_server_without_ranges_is_streamed(noise_dir, http_server, caplog):
    url, handler = http_server
    handler.ranges = False
    caplog.set_level(logging.WARNING, logger="data_pipelines.ranged")
    got, io_ = _steps(_loader(url), 2)
    assert got == _steps(_loader(noise_dir), 2)[0]
    assert io_["data/bytes_read"] > io_["data/bytes_used"]
    assert any("ignores Range" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- S3 (moto's real server)
def test_s3_ranged_gets_against_a_local_s3_server(noise_dir, monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(ranged, "_s3_clients", {})
        client = ranged.s3_client()
        client.create_bucket(Bucket="shards")
        for name in os.listdir(noise_dir):
            client.upload_file(os.path.join(noise_dir, name), "shards", f"noise/{name}")
        local, local_io = _steps(_loader(noise_dir, 0, 2), 3)
        got, io_ = _steps(_loader("s3://shards/noise", 0, 2), 3)
        assert got == local
        assert io_["data/bytes_used"] == local_io["data/bytes_used"] > 0
        assert io_["data/bytes_used"] <= io_["data/bytes_read"] <= 1.05 * io_["data/bytes_used"]
    finally:
        server.stop()
        ranged._s3_clients.clear()


# ------------------------------------------------------------------ pipe: streaming and the cache
def test_pipe_source_warns_once_and_the_cache_downloads_each_shard_once(noise_dir, tmp_path, caplog):
    pipe = f"pipe:cat {noise_dir}/{{shard}}"
    caplog.set_level(logging.WARNING, logger="data_pipelines.ranged")
    ranged._warned.discard("pipe")
    want, _ = _steps(_loader(noise_dir), 3)
    streamed, s_io = _steps(_loader(pipe), 3)
    assert streamed == want and s_io["data/bytes_read"] > s_io["data/bytes_used"]
    assert sum("pipe: sources are streamed" in r.getMessage() for r in caplog.records) == 1

    cache = str(tmp_path / "cache")
    first, c1 = _steps(_loader(pipe, cache_dir=cache), 3)
    again, c2 = _steps(_loader(pipe, cache_dir=cache), 3)  # a second rank / run on the node
    shards = sum(os.path.getsize(os.path.join(noise_dir, n)) for n in os.listdir(noise_dir) if n.endswith(".tar"))
    assert first == again == want
    assert c1["data/bytes_read"] <= shards and c2["data/bytes_read"] == 0
    # read by offset from the local copy (coalesced: within MAX_WASTE of the member bytes)
    assert c2["data/bytes_used"] <= c2["data/bytes_cached"] <= (1 + ranged.MAX_WASTE) * c2["data/bytes_used"]
    assert not [n for n in os.listdir(cache) if n.endswith(".tmp")]


def test_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path):
    cache = ShardCache(str(tmp_path / "c"), max_bytes=2500)
    stats = IOStats()
    for i, url in enumerate(["pipe:a", "pipe:b", "pipe:a", "pipe:c"]):
        os.close(cache.open(url, lambda f: f.write(b"x" * 1000), stats))
        os.utime(cache.path_for(url), (i, i))  # a clock that moves between uses
    assert stats.bytes_read == 3000  # a is downloaded once
    left = {u for u in ("pipe:a", "pipe:b", "pipe:c") if os.path.exists(cache.path_for(u))}
    assert left == {"pipe:a", "pipe:c"}  # b was the least recently used
    with pytest.raises(ValueError, match="> 0"):
        ShardCache(str(tmp_path / "z"), 0)


def test_cache_config_is_checked(noise_dir):
    with pytest.raises(ValueError, match="cache_max_gb"):
        DataConfig(sources=[DataSource(path=noise_dir)], cache_max_gb=0)
    with pytest.raises(ValueError, match="cache_dir"):
        DataConfig(sources=[DataSource(path=noise_dir)], cache_dir=" ")


def test_damaged_shard_keeps_the_samples_before_the_damage(noise_dir, tmp_path):
    d = str(tmp_path / "cut")
    shutil.copytree(noise_dir, d)
    path = os.path.join(d, "shard-000000.tar")
    blob = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    keys = {s["key"] for s in read_index(d)["shards"][0]["samples"]}
    got, err = read_shard_members(path, keys)
    assert err and 0 < len(got) < len(keys)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        first = tar.getmembers()[0]
    assert got[first.name.split(".")[0]]["json"] == blob[first.offset_data : first.offset_data + first.size]


def test_summary_prints_the_amplification():
    from qvl_train.monitor.summary import io_lines

    rows = [{"data/bytes_read": 2 << 20, "data/bytes_used": 1 << 20}, {"data/bytes_read": 1 << 20, "data/bytes_used": 1 << 20}]
    assert io_lines(rows)[0].startswith("data I/O         1.50x amplification: 3.0 MiB read for 2.0 MiB")
    assert io_lines([{"loss": 1.0}]) == []


def test_decode_workers_report_the_bytes_of_the_step_they_return(noise_dir):
    inline = _loader(noise_dir, 0, 2)
    pooled = _loader(noise_dir, 0, 2, num_workers=1, prefetch_steps=1)
    try:
        for _ in range(2):
            a, b = inline.next_step(), pooled.next_step()
            assert [x.sample_ids for x in a] == [x.sample_ids for x in b]
            assert inline.io_stats() == pooled.io_stats() and inline.io_stats()["data/bytes_used"] > 0
    finally:
        inline.close()
        pooled.close()


def test_a_failed_range_loses_only_its_own_samples(noise_dir, tmp_path):
    from data_pipelines.ranged import ShardReader
    from data_pipelines.stream import shard_request

    d = str(tmp_path / "cut")
    shutil.copytree(noise_dir, d)
    path = os.path.join(d, "shard-000000.tar")
    os.truncate(path, os.path.getsize(path) // 2)
    shard = read_index(d)["shards"][0]
    shard.pop("size")  # an index without the shard size cannot tell the shard changed
    reader = ShardReader()
    found, err, stats = reader.read(shard_request(path, shard, shard["samples"]))
    reader.close()
    whole = [s["key"] for s in shard["samples"] if max(o + n for o, n in s["members"].values()) <= os.path.getsize(path)]
    assert err and "EOFError" in err and sorted(found) == sorted(whole) and 0 < len(whole) < len(shard["samples"])
    assert stats.bytes_used == sum(len(v) for m in found.values() for v in m.values())
