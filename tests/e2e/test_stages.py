"""Stages select which modules receive gradients: a step changes exactly the stage's modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import clean_env, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_each_stage_updates_exactly_its_modules(data_root):
    env = {**clean_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/e2e/stage_probe.py"), str(data_root)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["images"] > 0 for r in report.values())  # the ViT saw images
    assert report["stage1_align"]["changed"] == ["projector"]
    assert report["stage2_multitask"]["changed"] == ["llm", "projector", "vision"]
    assert report["stage3_sft"]["changed"] == ["llm", "projector"]
    assert all(not r["frozen_changed"] for r in report.values())
