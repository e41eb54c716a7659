"""Hang and slowness diagnosis end to end on 2 CPU processes: a profiler trace of chosen steps,
straggler metrics, stacks on SIGUSR2, and a hung rank turning into a collective timeout that names
where every rank's stacks are."""

from __future__ import annotations

import json
import signal
import time

import psutil

from tests.conftest import read_metrics, torchrun_popen


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_profile_stragglers_stacks_and_collective_timeout(tmp_path, data_root):
    out = tmp_path / "diag"
    args = ["+experiment=tiny", f"cluster.data_root={data_root}", "data.max_tokens=512",
            "train.global_batch_tokens=1024", "wandb.mode=disabled", "checkpoint.every=1000",
            "train.max_steps=400", "train.collective_timeout_s=10", "profile.steps=[2,3]", f"output_dir={out}"]
    proc = torchrun_popen(2, *args)
    try:
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, 240, "4 logged steps")
        workers = {int(p.environ()["RANK"]): p for p in psutil.Process(proc.pid).children()}
        assert sorted(workers) == [0, 1]

        # SIGUSR2: every rank appends all its threads' stacks, without stopping the run.
        for p in workers.values():
            p.send_signal(signal.SIGUSR2)
        stacks = [out / "stacks" / f"rank{r}.txt" for r in (0, 1)]
        _wait_for(lambda: all(f.exists() and "launch/train.py" in f.read_text() for f in stacks), 30, "stacks on SIGUSR2")
        assert all("qvl_train/train.py" in f.read_text() for f in stacks)  # the main thread, inside the loop
        steps_before = len(metrics.read_text().splitlines())
        _wait_for(lambda: len(metrics.read_text().splitlines()) > steps_before + 1, 60, "the run to go on")

        # A rank that stops answering: the other one times out in its next collective and says where to look.
        workers[1].send_signal(signal.SIGSTOP)
        _wait_for(lambda: "collective timed out" in stacks[0].read_text(), 90, "rank 0 to time out")
        summary = out / "stacks" / "summary.txt"
        _wait_for(lambda: summary.exists() and "rank 1:" in summary.read_text(), 30, "rank 0's hang report")
        workers[1].send_signal(signal.SIGCONT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "train.collective_timeout_s=10" in stdout and "wrote its stacks to" in stdout, stdout[-3000:]
    rank0 = (out / "stacks" / "rank0.txt").read_text()
    assert "waited longer" not in rank0  # the file holds stacks and the exception, the message goes to the log
    assert "collective timed out" in rank0 and "Timed out waiting" in rank0  # all threads' stacks + the exception
    # the hang report: rank 0 names the stopped rank 1 instead of leaving it an empty or stale file
    report = (out / "stacks" / "summary.txt").read_text().split("=== hang report by rank ")[1]
    assert report.startswith("0 ") and "rank 0: stacks in rank0.txt" in report, report
    assert "rank 1: no stacks (stopped or dead)" in report, report
    assert "no stacks (stopped or dead)" in (out / "stacks" / "rank1.txt").read_text()

    trace = out / "profile" / "rank0.steps2-3.json"
    assert trace.exists() and (out / "profile" / "rank1.steps2-3.json").exists()
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::mm" in e.get("name", "") or "aten::addmm" in e.get("name", "") for e in events)

    rows = read_metrics(out)
    assert all("straggler/max_over_median" in r and r["straggler/max_over_median"] >= 1.0 for r in rows)
    assert {r["straggler/slowest_rank"] for r in rows} <= {0.0, 1.0}
