"""`bash slurm/stageN.sh` outside a SLURM job: a message that the script is for `sbatch`, with the
command to run (the overrides passed through, shell-quoted), and exit status 2, at once."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_stage_script_outside_sbatch_says_how_to_submit(stage):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", f"slurm/{stage}.sh", "+experiment=tiny", "output_dir=/tmp/my run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=5,
    )
    assert time.monotonic() - start < 5
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "common.sh" not in proc.stderr
    assert "SLURM batch script" in proc.stderr and "sbatch" in proc.stderr
    assert f"  sbatch slurm/{stage}.sh +experiment=tiny output_dir=/tmp/my\\ run\n" in proc.stderr, proc.stderr
    assert "torchrun --nproc_per_node=2 launch/train.py stage=" in proc.stderr
