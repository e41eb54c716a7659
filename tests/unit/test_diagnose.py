"""Straggler report, profile-range validation, timeout classification, stack dumps."""

from __future__ import annotations

import pytest

from qvl_train.config import ConfigError, ProfileConfig, TrainLoopConfig
from qvl_train.monitor.diagnose import StackDumper, StragglerWindow, is_timeout, straggler_report


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


def _feed(window: StragglerWindow, rows: list[list[float]], hosts: list[str]) -> list[tuple[int, str]]:
    """(update number, warning) for every update that warned."""
    out = []
    for i, times in enumerate(rows, 1):
        metrics, warning = window.update(times, hosts)
        assert set(metrics) == {"straggler/max_over_median", "straggler/slowest_rank"}  # every step
        if warning:
            out.append((i, warning))
    return out


def test_straggler_window_ignores_noise_of_a_busy_host():
    """The 2-core demo: each rank is slow now and then (here every third step, alternating): no warning."""
    rows = [[1.0, 2.0] if i % 3 == 0 else [2.0, 1.0] if i % 3 == 1 else [1.0, 1.0] for i in range(200)]
    assert _feed(StragglerWindow(1.25, 20), rows, ["h", "h"]) == []
    assert straggler_report(rows[0], ["h", "h"], 1.25)[1] is not None  # what warned at every such step before


def test_straggler_window_names_a_slow_rank_once_per_window():
    hosts = ["n0", "n0", "n1", "n1"]
    rows = [[1.0, 1.0, 1.0, 2.0 if i % 4 else 1.0] for i in range(60)]  # rank 3 slow in 3 of 4 steps
    warned = _feed(StragglerWindow(1.25, 20), rows, hosts)
    assert [i for i, _ in warned] == [20, 40, 60]  # the first full window, then once per window
    step, message = warned[0]
    assert "rank 3 on n1 (2.00× the median in 15 of them)" in message and "last 20 logged steps" in message
    assert "rank 0" not in message and "rank 2" not in message


def test_straggler_window_needs_a_majority_and_a_full_window():
    rows = [[1.0, 2.0 if i % 2 else 1.0] for i in range(40)]  # slow in exactly half: not a majority
    assert _feed(StragglerWindow(1.25, 10), rows, ["a", "b"]) == []
    rows = [[1.0, 2.0]] * 9
    assert _feed(StragglerWindow(1.25, 10), rows, ["a", "b"]) == []  # 9 updates: the window is not full
    assert [i for i, _ in _feed(StragglerWindow(1.25, 1), [[1.0, 2.0]] * 3, ["a", "b"])] == [1, 2, 3]
    assert _feed(StragglerWindow(0, 10), [[1.0, 9.0]] * 30, ["a", "b"]) == []  # threshold 0: metrics only


def test_straggler_window_two_slow_ranks_slowest_first():
    rows = [[1.0, 1.0, 1.5, 3.0, 1.0]] * 5
    (i, message), = _feed(StragglerWindow(1.25, 5), rows, ["a", "b", "c", "d", "e"])
    assert i == 5 and message.index("rank 3 on d (3.00×") < message.index("rank 2 on c (1.50×")


def test_config_validation():
    with pytest.raises(ConfigError, match="train.straggler_window"):
        TrainLoopConfig(straggler_window=0)
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
