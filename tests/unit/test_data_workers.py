"""Decode workers (data.num_workers): bit-identical to inline building, skips counted when a step is
consumed, exact resume with prefetched steps dropped, no worker outlives its loader or its process."""

import glob
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from data_pipelines.schema import DataConfig, DataSource
from data_pipelines.stream import StepLoader
from data_pipelines.synth import generate
from data_pipelines.workers import SHM_MIN_BYTES, WorkerError, from_wire, shm_prefix, to_wire
from tests.unit.test_data_stream import _corrupt_copy

STEPS = 5


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """160 synthetic samples with a broken JSON, a garbage PNG, a missing member and a truncated shard."""
    good = str(tmp_path_factory.mktemp("synth") / "good")
    generate(good, 160, seed=7, samples_per_shard=40, min_side=56, max_side=224)
    bad = str(tmp_path_factory.mktemp("synth") / "bad")
    _corrupt_copy(good, bad)
    return bad


def _loader(path, **kw):
    cfg = DataConfig(sources=[DataSource(path=path)], max_tokens=1024, max_bad_fraction=0.5, **kw)  # ~15% bad
    return StepLoader(cfg, micro_batches_per_step=4, dp_rank=0, dp_size=1)


@pytest.fixture(scope="module")
def inline(bad_dir):
    """Batches and stats() after each of STEPS steps, built inline, plus the state after step 2."""
    ld = _loader(bad_dir)
    steps, stats, states = [], [], []
    for _ in range(STEPS):
        steps.append(ld.next_step())
        stats.append(ld.stats())
        states.append(ld.state_dict())
    ld.close()
    return steps, stats, states


@pytest.fixture(scope="module")
def pooled(bad_dir):
    ld = _loader(bad_dir, num_workers=2, prefetch_steps=2)
    yield ld
    ld.close()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for an orphan-reaping init counts as exited)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key, value in x.__dict__.items():
            other = y.__dict__[key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), key
            else:
                assert value == other, key


def test_config_validation():
    for bad in ({"num_workers": -1}, {"num_workers": True}, {"num_workers": 1.5}, {"prefetch_steps": 0}, {"num_workers": 65}):
        with pytest.raises(ValueError, match="data.(num_workers|prefetch_steps)"):
            DataConfig(**bad)
    assert DataConfig().num_workers == "auto" and DataConfig().prefetch_steps == 2


def test_wire_format_round_trips_tensors_and_shared_memory(tmp_path):
    big = np.random.default_rng(0).random((SHM_MIN_BYTES // 4 + 7, 1)).astype(np.float32)
    sample = {"positions": torch.arange(6).reshape(3, 2), "nested": [(torch.ones(2, dtype=torch.float32), 3)],
              "id": "x", "pixel_values": [big, big[:2]], "pos_big": torch.from_numpy(big.astype(np.int64))}
    wire = to_wire(sample, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 2  # the two large arrays, not the small ones
    back = from_wire(pickle.loads(pickle.dumps(wire)))
    assert not os.listdir(tmp_path)  # mapped and unlinked on arrival
    assert torch.equal(back["positions"], sample["positions"]) and back["positions"].dtype == torch.int64
    assert isinstance(back["nested"][0], tuple) and torch.equal(back["nested"][0][0], torch.ones(2))
    assert back["id"] == "x" and back["pixel_values"][0].dtype == np.float32
    assert np.array_equal(back["pixel_values"][0], big) and np.array_equal(back["pixel_values"][1], big[:2])
    assert torch.equal(back["pos_big"], sample["pos_big"])


def test_workers_bit_identical_and_skips_counted_when_consumed(pooled, inline):
    steps, stats, _ = inline
    assert stats[-1]["data_skipped"] >= 3  # the corrupt samples are in these steps
    for i in range(STEPS):
        _assert_same(pooled.next_step(), steps[i])
        # steps i+1, i+2 are built already, their bad samples are not counted yet
        assert pooled.stats() == stats[i]
    assert len(pooled._jobs) == 2


def test_resume_drops_prefetched_steps(pooled, inline):
    steps, _, states = inline
    pooled.load_state_dict(states[1])  # the state after step 2; steps that were prefetched are gone
    assert not pooled._jobs
    for i in range(2, STEPS):
        _assert_same(pooled.next_step(), steps[i])
    assert pooled.state_dict() == states[-1]


def test_dead_worker_is_a_clear_error_and_close_reaps_workers(pooled):
    pids = pooled.worker_pids
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(WorkerError, match="num_workers=0"):
        for _ in range(3):  # the next builds that land on the killed worker fail
            pooled.next_step()
    pooled.close()
    assert pooled.worker_pids == []
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]  # exited and reaped: no child left
    assert not glob.glob(f"/dev/shm/{shm_prefix(os.getpid())}*")  # no result left in shared memory


PARENT = textwrap.dedent("""
    import os, sys, time
    with open(sys.argv[2], "a") as f:  # once per import of this __main__: workers must not re-import it
        f.write(f"{os.getpid()}\\n")
    from data_pipelines.schema import DataConfig, DataSource
    from data_pipelines.stream import StepLoader
    ld = StepLoader(DataConfig(sources=[DataSource(sys.argv[1])], max_tokens=1024, num_workers=1),
                    micro_batches_per_step=1, dp_rank=0, dp_size=1)
    ld.next_step()  # the worker has served; the next step is being built when the parent is killed
    print(*ld.worker_pids, flush=True)
    time.sleep(600)
""")


def test_workers_die_with_a_killed_parent(tmp_path, bad_dir):
    script, marks = tmp_path / "parent.py", tmp_path / "imports.txt"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    parent = subprocess.Popen([sys.executable, str(script), bad_dir, str(marks)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 1 and _alive(pids[0])
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 30
    while _alive(pids[0]) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(pids[0])  # end-of-file on its task pipe: it exited
    assert marks.read_text().split() == [str(parent.pid)]  # the worker never imported the trainer's __main__
    assert not glob.glob(f"/dev/shm/{shm_prefix(parent.pid)}*")  # nor left results in shared memory
