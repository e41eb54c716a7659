"""Shard sources (local, brace, pipe:, http), per-source caps, epochs of a blend, planning ahead."""

import functools
import http.server
import json
import logging
import os
import threading

import pytest

from data_pipelines.packing import GlobalPlanner
from data_pipelines.schema import DataConfig, DataSource
from data_pipelines.shards import ShardWriter, read_index
from data_pipelines.stream import StepLoader
from data_pipelines.synth import generate


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    generate(str(d), 60, seed=5, samples_per_shard=20, min_side=56, max_side=320)
    return str(d)


def _text_source(path, n, words=lambda i: 3 + i % 7, prefix="t"):
    with ShardWriter(path, samples_per_shard=10) as w:
        for i in range(n):
            text = " ".join(f"w{j}" for j in range(words(i)))
            w.add(f"{prefix}{i}", [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}], {})
    return path


def _loader(sources, micro=2, dp_rank=0, dp_size=1, **kw):
    kw.setdefault("max_tokens", 512)
    return StepLoader(DataConfig(sources=sources, **kw), micro_batches_per_step=micro, dp_rank=dp_rank, dp_size=dp_size)


def _run(loader, steps):
    """Per step: (sample ids per micro-batch, input ids of every micro-batch)."""
    out = []
    for _ in range(steps):
        batches = loader.next_step()
        out.append(([b.sample_ids for b in batches], [b.input_ids.tolist() for b in batches]))
    return out


@pytest.fixture
def http_root(synth_dir):
    """A local http server serving the synth shard directory."""
    handler = functools.partial(_QuietHandler, directory=synth_dir)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_pipe_and_http_sources_see_the_local_samples(synth_dir, http_root):
    ref = _run(_loader([DataSource(synth_dir)]), 2)
    assert sum(len(ids) for ids in ref[0][0]) >= 4
    for src in (
        DataSource(f"pipe:cat {synth_dir}/{{shard}}"),
        DataSource(f"pipe:cat {synth_dir}/{{shard}}", index=os.path.join(synth_dir, "index.json")),
        DataSource(http_root),
        DataSource(http_root + "/{shard}", index=f"pipe:cat {synth_dir}/index.json"),
    ):
        ld = _loader([src])
        assert _run(ld, 2) == ref, src
        assert ld.stats()["data_skipped"] == 0


def test_brace_pattern_selects_its_shards(synth_dir, http_root):
    names = [sh["name"] for sh in read_index(synth_dir)["shards"]]
    ld = _loader([DataSource(os.path.join(synth_dir, "shard-{000002,000000}.tar"))], micro=4)
    assert [sh["name"] for sh in ld.planner.indices[0]["shards"]] == [names[2], names[0]]
    allowed = {s["id"] for sh in ld.planner.indices[0]["shards"] for s in sh["samples"]}
    seen = [i for ids, _ in _run(ld, 2) for mb in ids for i in mb]
    assert seen and set(seen) <= allowed and len(allowed) == 40
    for path in (f"pipe:cat {synth_dir}/shard-{{000000..000001}}.tar", http_root + "/shard-{000000..000001}.tar"):
        ld = _loader([DataSource(path)])
        assert len(ld.planner.indices[0]["shards"]) == 2 and ld.stats()["data_skipped"] == 0
        assert len(_run(ld, 1)[0][0]) == 2
    with pytest.raises(ValueError, match="not in its index"):
        _loader([DataSource(os.path.join(synth_dir, "shard-{000000..000009}.tar"))])


def test_source_config_errors(synth_dir, tmp_path):
    for kw, msg in (
        ({"path": "abfs://bucket/data"}, r"pipe:aws s3 cp abfs://bucket/data/\{shard\}"),  # s3:// is read by boto3
        ({"path": "pipe:aws s3 cp s3://bucket/data -"}, r"needs \{shard\}"),
        ({"path": ""}, "empty"),
        ({"path": synth_dir, "weight": -1.0}, "weight"),
        ({"path": synth_dir, "max_frames": 0}, "max_frames=0 must be a positive integer"),
        ({"path": synth_dir, "max_pixels": 1.5}, "max_pixels"),
    ):
        with pytest.raises(ValueError, match=msg):
            DataSource(**kw)
    with pytest.raises(ValueError, match=r"sources\[0\].max_tokens=600 exceeds data.max_tokens=512"):
        DataConfig(sources=[DataSource(synth_dir, max_tokens=600)], max_tokens=512)
    with pytest.raises(ValueError, match=r"sources\[0\].max_pixels=100 is below data.min_pixels"):
        DataConfig(sources=[DataSource(synth_dir, max_pixels=100)])
    with pytest.raises(FileNotFoundError, match="index.json"):
        _loader([DataSource(str(tmp_path))])
    with pytest.raises(ValueError, match="could not read the shard index"):
        _loader([DataSource(f"pipe:cat {tmp_path}/{{shard}}")])


def test_per_source_max_pixels_caps_plan_and_pixels(synth_dir):
    cap = 56 * 56 * 2
    plain = _loader([DataSource(synth_dir)])
    capped = _loader([DataSource(synth_dir, max_pixels=cap, max_frames=8)], micro=4)
    refs = [(0, sh, i) for sh in range(3) for i in range(20) if capped.planner.entry((0, sh, i))["images"]]
    lower = [r for r in refs if capped.planner.cost(r) < plain.planner.cost(r)]
    assert len(lower) > len(refs) // 4  # the index's costs are recomputed under the cap
    assert capped.builders[0].cfg.video_max_frames == 8 and capped.builders[0].cfg.max_pixels == cap
    n = 0
    for b in capped.next_step() + capped.next_step():
        pixels = b.grid_thw[:, 1] * b.grid_thw[:, 2] * 14 * 14
        assert (pixels <= cap).all()
        n += b.grid_thw.shape[0]
    assert n > 0 and "data_skipped/cost_mismatch" not in capped.stats()


def test_per_source_max_tokens_truncates_text_and_rejects_media(synth_dir, tmp_path):
    text = _text_source(str(tmp_path / "long"), 20, words=lambda i: 20 + 30 * (i % 4))
    ld = _loader([DataSource(text, max_tokens=64), DataSource(synth_dir, max_tokens=64)], micro=2, max_tokens=256)
    lengths = []
    for b in ld.next_step() + ld.next_step():
        cu = b.cu_seqlens.tolist()
        lengths += [e - a for a, e in zip(cu[:-1], cu[1:])]
        assert b.grid_thw.shape[0] == 0  # every synth sample with an image costs more than 64 tokens
    assert max(lengths) == 64 and lengths.count(64) >= 3
    st = ld.stats()
    assert st["data_truncated"] >= 3 and st["data_skipped/too_long"] >= 1
    assert "data_skipped/cost_mismatch" not in st


def test_blend_over_epochs_keeps_weights_and_reshuffles(tmp_path, caplog):
    small = _text_source(str(tmp_path / "small"), 40, prefix="s")
    big = _text_source(str(tmp_path / "big"), 400, prefix="b")
    cfg = DataConfig(sources=[DataSource(small, 1.0), DataSource(big, 3.0)], max_tokens=256)
    planner = GlobalPlanner(cfg, [read_index(small), read_index(big)])
    epochs: dict[int, list] = {}
    draws = 0
    while planner.cursors[0].epoch < 3:
        ref = planner._draw_usable()
        draws += 1
        if ref[0] == 0 and planner.cursors[0].epoch < 3:
            epochs.setdefault(planner.cursors[0].epoch, []).append(ref)
    assert [len(epochs[e]) for e in range(3)] == [40, 40, 40]
    assert all(set(epochs[e]) == set(epochs[0]) for e in range(3))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert abs(120 / draws - 0.25) < 0.05, 120 / draws
    assert planner.pop_epoch_events() == [(0, 1), (0, 2), (0, 3)]

    caplog.set_level(logging.INFO, logger="data_pipelines.stream")
    rank0 = StepLoader(cfg, micro_batches_per_step=4, dp_rank=0, dp_size=2)
    rank1 = StepLoader(cfg, micro_batches_per_step=4, dp_rank=1, dp_size=2)
    for _ in range(12):
        rank0.next_step()
        rank1.next_step()
    lines = [r.getMessage() for r in caplog.records if "new shuffle" in r.getMessage()]
    assert len(lines) == len(set(lines)) == rank0.state_dict()["cursors"][0][0] >= 2  # rank 0 only, once each
    assert all(f"source 0 ({small})" in line for line in lines)


def test_plan_ahead_equals_inline_and_resumes_exactly(synth_dir):
    sources = [DataSource(synth_dir)]
    ahead, inline = _loader(sources, micro=4, plan_ahead=True), _loader(sources, micro=4, plan_ahead=False)
    for step in range(4):
        a, b = ahead.next_step(), inline.next_step()
        assert [x.sample_ids for x in a] == [x.sample_ids for x in b], step
        assert ahead.state_dict() == inline.state_dict()
        assert ahead.last_step_stats() == inline.last_step_stats()
        assert ahead.stats() == inline.stats()
    ahead._ahead.result()  # the next step is planned: the live planner is a step further
    assert ahead.planner.state_dict() != ahead.state_dict()
    state = json.loads(json.dumps(ahead.state_dict()))
    expected = _run(inline, 3)
    for plan_ahead in (True, False):
        resumed = _loader(sources, micro=4, plan_ahead=plan_ahead)
        resumed.next_step()  # a plan made ahead before the restore is dropped
        resumed.load_state_dict(state)
        assert _run(resumed, 3) == expected
        resumed.close()
    ahead.close()


def test_source_caps_reach_planner_and_builder_alike():
    """A source's max_frames / max_pixels give one DataConfig that planner and loader both use."""
    from data_pipelines.schema import DataConfig, DataSource

    src = DataSource("x", max_frames=6, max_pixels=100_000)
    cfg = DataConfig(sources=[src, DataSource("y")], video_min_frames=8, video_max_frames=64).for_source(src)
    assert (cfg.video_max_frames, cfg.video_min_frames, cfg.max_pixels) == (6, 6, 100_000)
    other = DataConfig(sources=[src], video_max_frames=4).for_source(src)
    assert other.video_max_frames == 4  # a looser source cap does not raise the run's
