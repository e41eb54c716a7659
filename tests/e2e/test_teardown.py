"""An exception inside a training step: the run fails loudly and leaves nothing behind.

Every exit path of `qvl_train.train.run` goes through one ExitStack; this is the path that used to
skip it. The probe (raise_probe.py) makes step 3 raise on every rank while decode workers run
(`data.num_workers=1`) and an asynchronous checkpoint of step 2 may still be writing.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from tests.conftest import ROOT, clean_env, free_port


def _descendants(pid: int) -> dict[int, tuple[float, str]]:
    """pid → (start time, command line) of every live descendant of `pid`."""
    found = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            found[child.pid] = (child.create_time(), " ".join(child.cmdline()))
        except psutil.Error:
            continue
    return found


def _alive(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_exception_in_a_step_closes_everything(tmp_path, data_root):
    out = tmp_path / "raise"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(ROOT / "tests" / "e2e" / "raise_probe.py"), "2",
        "+experiment=tiny", f"cluster.data_root={data_root}", f"output_dir={out}", "data.max_tokens=512",
        "train.global_batch_tokens=1024", "train.max_steps=10", "checkpoint.every=2", "checkpoint.async_save=true",
        "data.num_workers=1", "wandb.mode=offline",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**clean_env(), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, tuple[float, str]] = {}
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:  # every process the run starts, while it runs
        seen.update(_descendants(proc.pid))
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    output = proc.communicate(timeout=60)[0]

    assert proc.returncode != 0, output[-3000:]
    assert "injected failure at step 2" in output, output[-3000:]
    assert any("data_pipelines.workers" in cmdline for _, cmdline in seen.values()), "no decode worker was seen"
    time.sleep(1.0)  # a process of this run still alive now outlived the launcher
    left = {pid: cmdline for pid, (started, cmdline) in seen.items() if _alive(pid, started)}
    assert not left, f"processes of the failed run are still alive: {left}"

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    debug = (runs[0] / "logs" / "debug.log").read_text()
    # `run.finish(exit_code=...)` from the run itself, not the wandb service noticing a dead client
    assert "got exitcode: 1" in debug, debug[-2000:]
    assert (out / "metrics.jsonl").read_text().count('"kind":"train"') == 2  # steps 1 and 2
    # step 2's asynchronous save was still in flight (it is finalised after a later step): its writer
    # was stopped, and the half-written step never became a checkpoint to resume from
    assert not (out / "checkpoints" / "latest").exists() and not (out / "checkpoints" / "step_0000002" / "complete").exists()
