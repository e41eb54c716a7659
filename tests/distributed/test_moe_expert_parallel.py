"""Expert parallelism computes the single-process step: tiny Qwen3-VL MoE at ep=2 (2 processes, one
torchrun launch) vs one process on the same micro-batches — losses of 3 steps, the load-balancing
loss and the expert load equal, and after step 1 every gradient (experts gathered from their ranks)
within 1e-5 relative (fp32). Experts 0-1 live on rank 0 and 2-3 on rank 1, so routed tokens cross
ranks in the all-to-all, and expert gradients are summed over the expert-data-parallel group only.
Then tensor × expert parallel (tp=2 with sequence parallelism × ep=2, 4 processes): one step's
gradients, assembled from the sharded state dict by `grad_probe.py`, within 1e-5 of one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import clean_env, free_port
from tests.distributed.test_grad_equivalence import _probe as grad_probe

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "distributed" / "moe_probe.py"


def _probe(out: Path, nproc: int, ep: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(PROBE), str(out), str(ep)]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


def test_expert_parallel_matches_single_process(tmp_path):
    ref = _probe(tmp_path / "single.pt", 1, 1)
    got = _probe(tmp_path / "ep2.pt", 2, 2)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["aux"] == pytest.approx(ref["aux"], rel=1e-5)
    assert all(a > 0 for a in ref["aux"])
    assert got["load"] == ref["load"]  # routed tokens per expert: integers
    assert sum(ref["load"][0][0]) > 0
    assert set(got["grads"]) == set(ref["grads"])
    assert any("local_experts.3." in n for n in ref["grads"])
    for name, g in ref["grads"].items():
        err = float((got["grads"][name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < 1e-5, (name, err)


def test_tensor_times_expert_parallel_gradients(tmp_path, data_root):
    moe = ["+experiment=tiny_qwen3_vl_moe", "data.max_tokens=512", "train.global_batch_tokens=1024"]
    ref = grad_probe(tmp_path / "single.pt", data_root, 1, moe)
    got = grad_probe(tmp_path / "tp2sp_ep2.pt", data_root, 4, [*moe, "parallel.tp=2", "parallel.sp=true", "parallel.ep=2"])
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert set(got["grads"]) == set(ref["grads"]) and any(".experts." in k for k in ref["grads"])
    for key, g in ref["grads"].items():
        err = float((got["grads"][key] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < 1e-5, (key, err)
