"""`python -m qvl_train.tools.hf_parity`: PASS on tiny random checkpoints of both generations, also with
the framework model at pp=2 and tp=2 (processes the tool starts).

Runs the CLI in a subprocess (its own one-rank process group) on a tiny HF model saved with
`save_pretrained`; every input kind must be within 1e-5 relative (fp32) and the exit status 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.unit.test_convert import _cfg, _hf_model  # noqa: E402
from tests.conftest import clean_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "generation, layout",
    [
        ("qwen2_vl", []),
        ("qwen2_5_vl", []),
        ("qwen2_vl", ["--pp", "2"]),  # tied embeddings across two pipeline stages
        ("qwen2_5_vl", ["--tp", "2"]),  # window-attention ViT and vocabulary split over two ranks
    ],
)
def test_hf_parity_tool_passes(generation, layout, tmp_path):
    _hf_model(_cfg(generation), seed=3).to(torch.float32).save_pretrained(tmp_path / "hf", safe_serialization=True)
    proc = subprocess.run(
        [sys.executable, "-m", "qvl_train.tools.hf_parity", "--hf-dir", str(tmp_path / "hf"), *layout],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**clean_env(), "PYTHONWARNINGS": "ignore"},
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert lines[-1].startswith("PASS")
    assert lines[-1].endswith(f"tp={layout[1] if '--tp' in layout else 1} pp={layout[1] if '--pp' in layout else 1} ep=1)")
    kinds = {line.split()[0] for line in lines[:-1]}
    assert {"one_image", "multi_image", "video", "text_only", "packed"} <= kinds
