"""`kill -9` of every process mid-run, with checkpoints written asynchronously: resuming reproduces the
uninterrupted run's losses bit for bit and the same sample ids at every step (2 CPU processes)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import psutil

from qvl_train.checkpoint.manager import verify_checkpoint
from tests.conftest import read_metrics, torchrun, torchrun_popen

STEPS = 14


def _args(data_root, out, *extra):
    return ["+experiment=tiny", f"cluster.data_root={data_root}", "data.max_tokens=512",
            "train.global_batch_tokens=1024", "wandb.mode=disabled", "data.trace=true",
            f"train.max_steps={STEPS}", f"output_dir={out}", *extra]


def _trace(out) -> list[dict]:
    rows = []
    for path in sorted((out / "data_trace").glob("dp*.jsonl")):
        rows += [{"file": path.name, **json.loads(l)} for l in path.read_text().splitlines() if l.strip()]
    return sorted(rows, key=lambda r: (r["step"], r["file"], r["micro"]))


def test_kill_9_during_async_checkpointing_then_resume_is_exact(tmp_path, data_root):
    ref = tmp_path / "ref"
    torchrun(2, *_args(data_root, ref, "checkpoint.every=1000"))

    out = tmp_path / "killed"
    args = _args(data_root, out, "checkpoint.every=1", "checkpoint.async_save=true", "checkpoint.keep_last=2")
    proc = torchrun_popen(2, *args)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 6):
        time.sleep(0.1)
    time.sleep(0.15)  # somewhere inside a step or an async write
    # torchrun, both ranks (torchrun starts each in a session of its own) and any checkpoint writer, at once
    everyone = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in everyone:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = len(read_metrics(out))
    assert 6 <= killed_at < STEPS, [(r["step"], r["step_time_s"]) for r in read_metrics(out)]

    latest = (out / "checkpoints" / "latest").read_text().strip()
    verify_checkpoint(out / "checkpoints" / latest)  # `latest` only ever names a complete checkpoint
    resumed = torchrun(2, *args)
    assert f"resumed from {out / 'checkpoints' / latest}" in resumed.stdout or "resumed from" in resumed.stdout

    got, want = read_metrics(out), read_metrics(ref)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # bit for bit
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]
    assert _trace(out) == _trace(ref)  # the same samples at every step, none twice, none skipped
    final = out / "checkpoints" / f"step_{STEPS:07d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == final.name
    verify_checkpoint(final)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == [f"step_{STEPS - 1:07d}", f"step_{STEPS:07d}"]  # keep_last=2 with async commits
