"""slurm/stage2.sh on a real single-node SLURM cluster: preempted mid-run, requeued, same losses.

`tests/slurm/cluster.sh` installs (once, with apt-get) and starts munge + slurmctld + slurmd on this
machine, or reuses them when they already run; it is left running for the next test run. The test
submits `slurm/stage2.sh` with the tiny experiment on CPU (2 gloo processes), sends SIGUSR1 to the batch
shell once a few steps are logged (what `#SBATCH --signal=B:USR1@120` does before a time limit), and
checks that the job saved a checkpoint, requeued itself, resumed with SLURM_RESTART_COUNT=1 and finished
with the losses of an uninterrupted `launch/train.py` run, bit for bit.

Skipped, with the reason, when not root or when SLURM cannot be installed here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env, free_port, read_metrics

CLUSTER_SH = ROOT / "tests" / "slurm" / "cluster.sh"
MAX_STEPS = 16  # the stop travels batch shell → stop file → 2 s poll → workers: ~5-8 s of 0.5 s steps on a quiet VM


def _cluster_up() -> None:
    if os.geteuid() != 0:
        pytest.skip("SLURM test needs root (tests/slurm/cluster.sh installs packages and starts daemons)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    proc = subprocess.run(["bash", str(CLUSTER_SH)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"SLURM cannot be set up here: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"tests/slurm/cluster.sh failed:\n{proc.stdout}\n{proc.stderr}"


def _job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "GONE"


def _steps(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_stage2_preempted_requeues_and_matches_uninterrupted(tmp_path, data_root):
    _cluster_up()
    overrides = [
        "+experiment=tiny", f"cluster.data_root={data_root}", f"train.max_steps={MAX_STEPS}",
        "data.max_tokens=512", "train.global_batch_tokens=1024", "wandb.mode=disabled", "checkpoint.every=1000",
    ]
    out = tmp_path / "slurm_run"
    job_log = tmp_path / "job.out"
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "QVL_ROOT": str(ROOT)}
    env.pop("NPROC_PER_NODE", None)

    # The reference (uninterrupted, plain torchrun) runs alongside the SLURM job to save wall time.
    ref_out = tmp_path / "reference"
    ref = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(ROOT / "launch" / "train.py"), *overrides, "stage=stage2_multitask", f"output_dir={ref_out}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    job_id = None
    try:
        # The script's #SBATCH lines ask for GPU nodes; the command line overrides them for this 2-CPU node.
        submit = subprocess.run(
            ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={min(2, os.cpu_count() or 1)}",
             "--time=15", f"--output={job_log}", "--job-name=qvl-test-stage2",
             str(ROOT / "slurm" / "stage2.sh"), *overrides, f"output_dir={out}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        assert submit.returncode == 0, submit.stderr
        job_id = submit.stdout.strip().split(";")[0]

        metrics = out / "metrics.jsonl"
        deadline = time.time() + 180
        while _steps(metrics) < 3:
            state = _job_state(job_id)
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state} early:\n{_tail(job_log)}"
            assert time.time() < deadline, f"no 3 steps within 180 s:\n{_tail(job_log)}"
            time.sleep(0.5)
        assert _steps(metrics) < MAX_STEPS - 2, "the run went too fast to interrupt it mid-way"
        # What `--signal=B:USR1@120` does before a time limit: SIGUSR1 to the batch shell only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)

        deadline = time.time() + 240
        while (state := _job_state(job_id)) != "COMPLETED":
            assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"), \
                f"job ended {state}:\n{_tail(job_log)}"
            assert time.time() < deadline, f"job not finished within 240 s of the signal ({state}):\n{_tail(job_log)}"
            time.sleep(1)
        ref_stdout, _ = ref.communicate(timeout=300)
        assert ref.returncode == 0, ref_stdout[-4000:]
    finally:
        if ref.poll() is None:
            ref.kill()
        if job_id is not None and _job_state(job_id) not in ("COMPLETED", "GONE", "FAILED", "CANCELLED"):
            subprocess.run(["scancel", job_id], timeout=30)

    log = job_log.read_text()
    stopped = [int(line.split("stopped after step ")[1].split()[0]) for line in log.splitlines()
               if "stopped after step " in line]
    assert len(stopped) == 1 and 3 <= stopped[0] < MAX_STEPS, log[-4000:]
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-4000:]
    assert f"start: resumed from {out}/checkpoints/step_{stopped[0]:07d} at step {stopped[0]}" in log, log[-4000:]
    starts = [json.loads(line) for line in (out / "slurm_jobs.jsonl").read_text().splitlines()]
    assert [s["restart_count"] for s in starts] == [0, 1]
    assert all(str(s["job_id"]) == job_id for s in starts)

    rows, ref_rows = read_metrics(out), read_metrics(ref_out)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # exact resume: bit for bit on CPU
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS:07d}"


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text()[-n:] if path.exists() else "(no job output yet)"
