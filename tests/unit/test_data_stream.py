"""Global stream, packing, dp-independence, exact resume, bad data, synth factory."""

import io
import json
import os
import tarfile

import pytest
import torch

from data_pipelines.packing import GlobalPlanner
from data_pipelines.schema import IGNORE_INDEX, DataConfig, DataSource
from data_pipelines.shards import read_index
from data_pipelines.stream import StepLoader, pack, read_shard_members
from data_pipelines.synth import generate
from data_pipelines.text import PAD_ID

PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    generate(str(d), 160, seed=7, samples_per_shard=40, min_side=56, max_side=224)
    return str(d)


def _cfg(path, **kw):
    kw.setdefault("max_tokens", 512)
    return DataConfig(sources=[DataSource(path=path)], **kw)


def _global_ids(loaders, steps):
    """Sample ids per step in global micro-batch order, reassembled from all dp ranks."""
    out = []
    dp = len(loaders)
    for _ in range(steps):
        per_rank = [ld.next_step() for ld in loaders]
        mbs = [per_rank[j % dp][j // dp] for j in range(dp * len(per_rank[0]))]
        out.append([b.sample_ids for b in mbs])
    return out


def test_synth_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    sa = generate(a, 30, seed=3, samples_per_shard=16)
    generate(b, 30, seed=3, samples_per_shard=16)
    generate(c, 30, seed=4, samples_per_shard=16)
    assert sa["samples"] == 30 and len(sa["shards"]) == 2
    for name in ["index.json", "shard-000000.tar", "shard-000001.tar"]:
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    assert open(os.path.join(a, "shard-000000.tar"), "rb").read() != open(os.path.join(c, "shard-000000.tar"), "rb").read()
    assert not [f for f in os.listdir(a) if f.endswith(".tmp")]
    sizes = {tuple(hw) for sh in read_index(a)["shards"] for s in sh["samples"] for hw in s["images"]}
    assert len(sizes) > 5  # varied resolutions / aspect ratios


def test_packer_budget_and_efficiency(synth_dir):
    for max_tokens in (512, 1024):
        cfg = _cfg(synth_dir, max_tokens=max_tokens)
        planner = GlobalPlanner(cfg, [read_index(synth_dir)])
        used = []
        for _ in range(120):  # several epochs of the 160-sample set
            plan = planner.next_micro_batch()
            cost = sum(planner.cost(r) for r in plan)
            assert 0 < cost <= max_tokens
            used.append(cost)
        eff = sum(used) / (len(used) * max_tokens)
        assert eff > 0.85, eff
        assert planner.epoch >= 2


def test_packed_batch_contract(synth_dir):
    cfg = _cfg(synth_dir)
    ld = StepLoader(cfg, micro_batches_per_step=4, dp_rank=0, dp_size=1)
    saw_image = False
    for b in ld.next_step() + ld.next_step():
        L = cfg.max_tokens
        assert b.input_ids.shape == (L,) and b.labels.shape == (L,) and b.position_ids.shape == (3, L)
        assert b.input_ids.dtype == b.labels.dtype == b.position_ids.dtype == torch.int64
        assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens[0] == 0
        assert int(b.cu_seqlens[-1]) == b.num_tokens <= L and len(b.cu_seqlens) == b.num_samples + 1
        assert b.num_tokens > 0.5 * L
        assert (b.input_ids[b.num_tokens:] == PAD_ID).all() and (b.labels[b.num_tokens:] == IGNORE_INDEX).all()
        assert (b.position_ids[:, b.num_tokens:] == 0).all()
        assert b.num_label_tokens == int((b.labels != IGNORE_INDEX).sum()) > 0
        n_pad = int((b.input_ids == 151655).sum())
        assert n_pad == b.num_visual_tokens == int((b.grid_thw.prod(1) // 4).sum())
        assert b.pixel_values.shape == (int(b.grid_thw.prod(1).sum()), PATCH_DIM)
        assert b.pixel_values.dtype == torch.uint8 and b.pixel_lut.shape == (2, 3, 256)  # codes + their tables
        moved = b.to("cpu")  # what the engines do: move, then normalise there
        assert moved.pixel_values.dtype == torch.float32 and moved.pixel_lut is None
        assert moved.pixel_values.shape == b.pixel_values.shape and moved.normalised() is moved
        for a, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
            assert b.position_ids[:, a].tolist() == [0, 0, 0]  # restart per sample
            assert b.input_ids[a] == 151644
            # Next-token targets: labels[i] is token i+1 of the same sample; nothing crosses a boundary.
            lab, ids = b.labels[a:e], b.input_ids[a:e]
            has = lab[:-1] != IGNORE_INDEX
            assert torch.equal(lab[:-1][has], ids[1:][has]) and lab[-1] == IGNORE_INDEX
            assert not (ids[1:][has] == 151655).any()  # never a visual token as a target
            assert ids[1:][has][-1] == 151645  # the assistant turn ends by predicting <|im_end|>
        saw_image |= b.grid_thw.shape[0] > 0
    assert saw_image
    empty = pack(cfg, [])
    assert empty.pixel_values.shape == (0, PATCH_DIM) and empty.grid_thw.shape == (0, 3)
    assert empty.to("cpu").pixel_values.shape == (0, PATCH_DIM)
    assert empty.cu_seqlens.tolist() == [0] and empty.num_tokens == 0


def test_text_only_micro_batch_has_empty_pixels(tmp_path):
    from data_pipelines.shards import ShardWriter

    d = str(tmp_path / "txt")
    with ShardWriter(d, samples_per_shard=8) as w:
        for i in range(12):
            w.add(f"t{i}", [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}], {})
    (b,) = StepLoader(_cfg(d, max_tokens=128), micro_batches_per_step=1, dp_rank=0, dp_size=1).next_step()
    assert b.num_samples >= 3 and b.pixel_values.shape == (0, PATCH_DIM) and b.grid_thw.shape == (0, 3)


def test_step_samples_independent_of_dp_size(synth_dir):
    cfg = _cfg(synth_dir)
    ref = _global_ids([StepLoader(cfg, micro_batches_per_step=4, dp_rank=0, dp_size=1)], 3)
    for dp in (2, 4):
        loaders = [StepLoader(cfg, micro_batches_per_step=4, dp_rank=r, dp_size=dp) for r in range(dp)]
        assert _global_ids(loaders, 3) == ref
        assert all(len(ld.state_dict()["buffer"]) == 16 for ld in loaders)
        assert len({json.dumps(ld.state_dict(), sort_keys=True) for ld in loaders}) == 1
    flat = [i for step in ref for mb in step for i in mb]
    assert len(flat) == len(set(flat))  # no sample twice within an epoch


def test_exact_resume_with_dp_change(synth_dir):
    cfg = _cfg(synth_dir)
    orig = StepLoader(cfg, micro_batches_per_step=4, dp_rank=0, dp_size=1)
    _global_ids([orig], 3)
    state = json.loads(json.dumps(orig.state_dict()))  # must survive JSON
    expected = _global_ids([orig], 3)
    for dp in (1, 2, 4):
        loaders = [StepLoader(cfg, micro_batches_per_step=4, dp_rank=r, dp_size=dp) for r in range(dp)]
        for ld in loaders:
            ld.load_state_dict(state)
        assert _global_ids(loaders, 3) == expected
    with pytest.raises(ValueError):  # a state of a different packing budget is refused
        StepLoader(_cfg(synth_dir, max_tokens=1024), micro_batches_per_step=4, dp_rank=0, dp_size=1).load_state_dict(state)


def test_epochs_reshuffle(synth_dir):
    planner = GlobalPlanner(_cfg(synth_dir), [read_index(synth_dir)])
    n = 160
    e0 = [planner._next_from_source(0) for _ in range(n)]
    e1 = [planner._next_from_source(0) for _ in range(n)]
    assert len(set(e0)) == n and set(e0) == set(e1) and e0 != e1
    assert planner.cursors[0].epoch == 1
    ordered = GlobalPlanner(_cfg(synth_dir, shuffle=False), [read_index(synth_dir)])
    assert [ordered._next_from_source(0) for _ in range(3)] == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]


def test_blended_sources(tmp_path, synth_dir):
    other = str(tmp_path / "other")
    generate(other, 60, seed=99, samples_per_shard=30)
    cfg = DataConfig(sources=[DataSource(synth_dir, 3.0), DataSource(other, 1.0)], max_tokens=512)
    p1 = GlobalPlanner(cfg, [read_index(synth_dir), read_index(other)])
    p2 = GlobalPlanner(cfg, [read_index(synth_dir), read_index(other)])
    refs = [p1._draw_usable() for _ in range(2000)]
    assert refs == [p2._draw_usable() for _ in range(2000)]
    share = sum(r[0] == 1 for r in refs) / len(refs)
    assert 0.2 < share < 0.3
    ld = StepLoader(cfg, micro_batches_per_step=2, dp_rank=0, dp_size=1, root=str(tmp_path))
    ids = [i for b in ld.next_step() for i in b.sample_ids]
    assert any(i.startswith("synth-7-") for i in ids)


def _corrupt_copy(src: str, dst: str) -> dict:
    """Copy a synth source, damaging shard 0: broken JSON, garbage PNG, a missing image member;
    shard 1 is truncated. Returns which sample keys were damaged how."""
    os.makedirs(dst)
    index = read_index(src)
    s0 = index["shards"][0]["samples"]
    with_img = [s["key"] for s in s0 if s["images"]]
    damaged = {"bad_json": s0[0]["key"], "bad_image": with_img[1], "missing_member": with_img[2]}
    with tarfile.open(os.path.join(src, "shard-000000.tar")) as tin, tarfile.open(os.path.join(dst, "shard-000000.tar"), "w") as tout:
        for m in tin.getmembers():
            key, ext = m.name.split(".", 1)
            data = tin.extractfile(m).read()
            if key == damaged["bad_json"] and ext == "json":
                data = data[: len(data) // 2]
            elif key == damaged["bad_image"] and ext == "img0.png":
                data = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20
            elif key == damaged["missing_member"] and ext == "img0.png":
                continue
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    blob = open(os.path.join(src, "shard-000001.tar"), "rb").read()
    open(os.path.join(dst, "shard-000001.tar"), "wb").write(blob[: len(blob) // 2 + 100])
    for name in index["shards"][2:]:
        open(os.path.join(dst, name["name"]), "wb").write(open(os.path.join(src, name["name"]), "rb").read())
    open(os.path.join(dst, "index.json"), "w").write(json.dumps(index))
    return damaged


def test_bad_data_is_skipped_and_counted(tmp_path, synth_dir):
    bad = str(tmp_path / "bad")
    _corrupt_copy(synth_dir, bad)
    cfg = _cfg(bad, max_tokens=1024, max_bad_fraction=0.5)  # ~15% bad: the default 1% would stop the loader
    ld = StepLoader(cfg, micro_batches_per_step=4, dp_rank=0, dp_size=1)
    n_samples = 0
    for _ in range(6):  # covers more than one epoch of 160 samples
        batches = ld.next_step()
        assert len(batches) == 4  # skips never change the number of micro-batches
        n_samples += sum(b.num_samples for b in batches)
    st = ld.stats()
    assert st["data_skipped/bad_json"] >= 1
    assert st["data_skipped/bad_image"] >= 1
    assert st["data_skipped/missing_member"] >= 1
    assert st["data_skipped/shard_error"] >= 5  # the truncated half of shard 1
    assert st["data_skipped"] == sum(v for k, v in st.items() if k.startswith("data_skipped/"))
    assert n_samples > 150
    # a rank that sees mostly bad data stops the run with a clear message
    strict = StepLoader(_cfg(bad, max_tokens=1024, bad_window=20, max_bad_fraction=0.01), micro_batches_per_step=4, dp_rank=0, dp_size=1)
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        for _ in range(6):
            strict.next_step()


def test_too_long_samples_are_skipped(synth_dir):
    cfg = _cfg(synth_dir, max_tokens=64)
    ld = StepLoader(cfg, micro_batches_per_step=2, dp_rank=0, dp_size=2)
    ld.next_step()
    assert ld.stats()["data_skipped/too_long"] > 0
    other = StepLoader(cfg, micro_batches_per_step=2, dp_rank=1, dp_size=2)
    other.next_step()  # plan-time skips are reported by dp rank 0 only (sum over ranks = total)
    assert other.stats()["data_skipped"] == 0


def test_synth_cli(tmp_path, capsys):
    from data_pipelines.synth.__main__ import main

    assert main(["--out", str(tmp_path / "cli"), "--num-samples", "20", "--seed", "1", "--samples-per-shard", "8"]) == 0
    assert "wrote 20 samples" in capsys.readouterr().out
    assert len(read_index(str(tmp_path / "cli"))["shards"]) == 3


def test_packed_spans_equal_samples_encoded_alone(synth_dir):
    """Each sample's span of a packed batch (ids, labels, positions, pixels, grids) equals that sample
    packed alone, so per-sample losses of a packed batch equal those of the samples run alone."""
    cfg = _cfg(synth_dir, generation="qwen2_5_vl")
    ld = StepLoader(cfg, micro_batches_per_step=2, dp_rank=0, dp_size=1)
    by_id = {}
    for sh in ld.planner.indices[0]["shards"]:
        for s in sh["samples"]:
            by_id[s["id"]] = (sh["name"], s["key"])
    checked = 0
    for b in ld.next_step():
        assert b.num_samples >= 2
        patch_at = 0
        grid_at = 0
        for j, sid in enumerate(b.sample_ids):
            name, key = by_id[sid]
            members, _ = read_shard_members(os.path.join(synth_dir, name), {key})
            alone = pack(cfg, [ld.builder.build(members[key])])
            a, e = int(b.cu_seqlens[j]), int(b.cu_seqlens[j + 1])
            n = e - a
            assert n == alone.num_tokens
            assert torch.equal(b.input_ids[a:e], alone.input_ids[:n])
            assert torch.equal(b.labels[a:e], alone.labels[:n])
            assert torch.equal(b.position_ids[:, a:e], alone.position_ids[:, :n])
            k, p = alone.grid_thw.shape[0], alone.pixel_values.shape[0]
            assert torch.equal(b.grid_thw[grid_at:grid_at + k], alone.grid_thw)
            assert torch.equal(b.pixel_values[patch_at:patch_at + p], alone.pixel_values)
            grid_at, patch_at = grid_at + k, patch_at + p
            checked += 1
        assert grid_at == b.grid_thw.shape[0] and patch_at == b.pixel_values.shape[0]
    assert checked >= 4
