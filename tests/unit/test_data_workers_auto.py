"""`data.num_workers=auto`: decode workers per rank from the CPUs the job has (SLURM allocation, cgroup
quota, affinity) over the local ranks, one core per rank kept for the loop; and the data-wait report
(`time/data_wait_*`, the windowed warning, the summary line)."""

from __future__ import annotations

import json

import pytest

from data_pipelines import workers
from data_pipelines.schema import DataConfig
from data_pipelines.workers import resolve_num_workers
from qvl_train.monitor.data_wait import DataWait
from qvl_train.monitor.summary import summarize


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake node: `machine(affinity, cgroup)` sets the CPU affinity and the cgroup cpu.max text
    (None: no file); returns the cgroup path to pass on."""
    def make(affinity: int, cgroup: str | None = None) -> str:
        monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(affinity)))
        path = tmp_path / "cpu.max"
        if cgroup is not None:
            path.write_text(cgroup + "\n")
        return str(path)
    return make


def test_slurm_16_cpus_for_8_local_ranks_gives_one_worker_each(machine):
    cg = machine(affinity=64, cgroup="max 100000")  # torchrun inside one srun task that holds 16 CPUs
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "16", "SLURM_NTASKS_PER_NODE": "1", "LOCAL_WORLD_SIZE": "8"}
    n, source = resolve_num_workers("auto", env=env, cgroup_path=cg)
    assert n == 1, source
    assert "SLURM_CPUS_PER_TASK=16" in source and "8 local ranks" in source


def test_cgroup_quota_smaller_than_affinity_wins(machine):
    cg = machine(affinity=32, cgroup="600000 100000")  # a container limited to 6 CPUs on a 32-core host
    n, source = resolve_num_workers("auto", env={"LOCAL_WORLD_SIZE": "2"}, cgroup_path=cg)
    assert n == 2 and "cgroup quota 6" in source  # 6 // 2 = 3 per rank, one for the loop


def test_one_task_per_rank_counts_each_tasks_affinity(machine):
    cg = machine(affinity=4)  # srun --ntasks-per-node=8 --cpus-per-task=4, no torchrun: affinity is per task
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "4", "SLURM_TASKS_PER_NODE": "8(x2)"}
    n, source = resolve_num_workers("auto", env=env, cgroup_path=cg)
    assert n == 3, source  # 32 CPUs on the node / 8 tasks


def test_nothing_left_for_workers_builds_inline(machine):
    cg = machine(affinity=2)
    assert resolve_num_workers("auto", env={"LOCAL_WORLD_SIZE": "2"}, cgroup_path=cg)[0] == 0
    assert resolve_num_workers("auto", env={"LOCAL_WORLD_SIZE": "4"}, cgroup_path=cg)[0] == 0
    assert resolve_num_workers("auto", env={}, cgroup_path=cg)[0] == 1  # one rank on 2 CPUs


def test_slurm_allocation_smaller_than_the_node(machine):
    cg = machine(affinity=128, cgroup="max 100000")  # the node's cores are visible, the job has 24
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "24", "LOCAL_WORLD_SIZE": "4"}
    assert resolve_num_workers("auto", env=env, cgroup_path=cg)[0] == 5


def test_integers_are_taken_as_they_are_and_bad_values_are_refused(machine):
    cg = machine(affinity=2)
    assert resolve_num_workers(6, env={"LOCAL_WORLD_SIZE": "8"}, cgroup_path=cg) == (6, "data.num_workers")
    assert DataConfig(num_workers="3").num_workers == 3
    assert DataConfig().num_workers == "auto"
    for bad in ("lots", "Auto", -2, 2.5):
        with pytest.raises(ValueError, match="data.num_workers=.*`auto` or an integer"):
            DataConfig(num_workers=bad)


def test_data_wait_warns_over_a_window_and_names_the_fix():
    dw = DataWait(threshold=0.05, window=20)
    for step in range(19):  # 10% wait on the slowest rank, but the window is not full yet
        dw.add(0.1, 1.0)
        metrics, warning = dw.update([0.1, 0.02], [(0.1, 1.0), (0.02, 1.0)], num_workers=0)
        assert warning is None
    assert metrics["time/data_wait_s"] == pytest.approx(0.1) and metrics["time/data_wait_share"] == pytest.approx(0.1)
    dw.add(0.1, 1.0)
    _, warning = dw.update([0.1, 0.02], [(0.1, 1.0), (0.02, 1.0)], num_workers=0)
    assert warning is not None and "data.num_workers (now 0" in warning and "cpus-per-task" in warning
    dw.add(0.1, 1.0)
    assert dw.update([0.1], [(0.1, 1.0)], num_workers=0)[1] is None  # quiet for a window after a warning
    quiet = DataWait(threshold=0.05, window=20)
    for step in range(40):  # 4%: below the threshold
        quiet.add(0.04, 1.0)
        assert quiet.update([0.04], [(0.04, 1.0)], num_workers=2)[1] is None


def test_data_wait_window_counts_steps_between_logged_steps():
    dw = DataWait(threshold=0.05, window=20)
    for _ in range(10):
        dw.add(0.2, 1.0)
    assert dw.local() == (pytest.approx(2.0), pytest.approx(10.0))
    assert dw.update([0.2], [(2.0, 10.0)], num_workers=1)[1] is None  # 10 steps < window
    for _ in range(10):
        dw.add(0.2, 1.0)
    dw.local()
    assert dw.update([0.2], [(2.0, 10.0)], num_workers=1)[1] is not None  # 20 steps at 20%


def test_summary_prints_the_data_wait_share(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 1.0, "tokens_per_s": 1.0, "step_time_s": 2.0, "packing_efficiency": 1.0,
             "time/data_wait_s": 0.5} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = [x for x in summarize(tmp_path).splitlines() if x.startswith("data wait")]
    assert line and "25.0% of step time" in line[0] and "data.num_workers" in line[0], line


def test_video_float_normalise_equals_the_table_bit_for_bit():
    """The video float path's arithmetic normalisation (faster than the table gather) is the table's."""
    import numpy as np

    from data_pipelines.video import normalise_codes, video_norm_lut
    from data_pipelines.vision import apply_lut

    codes = np.random.default_rng(0).integers(0, 256, (300, 3, 2, 196), dtype=np.uint8)
    for mean, std in (((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                      ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))):
        got, want = normalise_codes(codes, mean, std), apply_lut(codes, video_norm_lut(mean, std))
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
