"""Straggler report, profile-range validation, timeout classification, stack dumps."""

from __future__ import annotations

import pytest

from qvl_train.config import ConfigError, ProfileConfig, TrainLoopConfig
from qvl_train.monitor.diagnose import StackDumper, is_timeout, straggler_report


def test_straggler_report_names_slow_ranks_slowest_first():
    times = [1.0, 1.02, 1.6, 0.98, 1.3]
    hosts = ["n0", "n0", "n1", "n1", "n2"]
    metrics, warning = straggler_report(times, hosts, threshold=1.25)
    assert metrics["straggler/slowest_rank"] == 2.0
    assert metrics["straggler/max_over_median"] == pytest.approx(1.6 / 1.02)
    assert warning.index("rank 2 on n1") < warning.index("rank 4 on n2")
    assert "rank 1 " not in warning and "rank 0 " not in warning
    assert straggler_report([1.0, 1.1], ["a", "b"], threshold=1.25)[1] is None
    assert straggler_report(times, hosts, threshold=0)[1] is None  # metrics only


def test_config_validation():
    with pytest.raises(ConfigError, match="profile.steps"):
        ProfileConfig(steps=[3, 2])
    with pytest.raises(ConfigError, match="profile.steps"):
        ProfileConfig(steps=[0, 1])
    ProfileConfig(steps=[2, 2])
    with pytest.raises(ConfigError, match="straggler_threshold"):
        TrainLoopConfig(straggler_threshold=0.9)
    with pytest.raises(ConfigError, match="collective_timeout_s"):
        TrainLoopConfig(collective_timeout_s=1)


def test_timeout_classification():
    assert is_timeout(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 10000ms for recv operation"))
    assert is_timeout(RuntimeError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE)"))
    assert not is_timeout(ValueError("bad shape"))


def test_stack_dump_and_stall_watchdog(tmp_path):
    import time

    dumper = StackDumper(tmp_path, rank=3, stall_s=0.4)
    dumper.heartbeat(7)
    path = dumper.dump("asked")
    assert path == tmp_path / "stacks" / "rank3.txt"
    text = path.read_text()
    assert "=== rank 3" in text and "step 7: asked" in text and "test_diagnose.py" in text
    time.sleep(1.0)  # no heartbeat: the watchdog writes once
    dumper.close()
    assert "no progress for" in path.read_text()
    assert path.read_text().count("no progress for") == 1
