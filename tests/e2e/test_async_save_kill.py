"""`kill -9` of a rank while its asynchronous save is being written: no process of the run outlives torchrun.

Every process of the run carries a marker in its environment (inherited by forks and spawns alike), so
after torchrun has exited a scan of /proc/*/environ finds whatever survived — megatron's spawned results
Manager and forked writer used to (qvl_train/checkpoint/orphans.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env, free_port


def _with_marker(marker: str) -> list[int]:
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in env.read_bytes():
                found.append(int(env.parent.name))
        except OSError:  # gone, or another user's
            continue
    return [pid for pid in found if pid != os.getpid()]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_kill9_during_async_save_leaves_no_process(tmp_path, data_root):
    marker = f"QVL_RUN_MARKER={uuid.uuid4().hex}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(ROOT / "tests" / "e2e" / "kill_save_probe.py"),
        "+experiment=tiny", f"cluster.data_root={data_root}", f"output_dir={tmp_path / 'run'}", "data.max_tokens=512",
        "train.global_batch_tokens=1024", "train.max_steps=4", "checkpoint.every=1", "checkpoint.async_save=true",
        "train.collective_timeout_s=30", "wandb.mode=disabled",
    ]
    key, value = marker.split("=")
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", key: value}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _check_run(proc, marker)
    finally:  # whatever failed, leave no process of this run to the next test
        for pid in _with_marker(marker):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def _check_run(proc: subprocess.Popen, marker: str) -> None:
    seen_helpers = 0
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        seen_helpers = max(seen_helpers, len(_with_marker(marker)))
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    output = proc.communicate(timeout=60)[0]
    assert "save of" in output and "SIGKILL" in output, output[-3000:]
    assert proc.returncode != 0, output[-3000:]
    assert seen_helpers >= 4, f"torchrun, 2 ranks and the save helpers should have been seen, saw {seen_helpers} at most"
    left: list[int] = []
    for _ in range(20):  # PDEATHSIG is immediate; allow the kernel a moment to reap
        left = _with_marker(marker)
        if not left:
            break
        time.sleep(0.25)
    cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200] for pid in left
                if Path(f"/proc/{pid}/cmdline").exists()}
    assert not left, f"processes of the run outlived torchrun: {cmdlines}"
