"""Shared fixtures: the repo root, a small synthetic shard set, and a torchrun helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """os.environ without the rendezvous variables of a process group this process may hold."""
    drop = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _torchrun_cmd(nproc: int, overrides) -> tuple[list[str], dict[str, str]]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", str(ROOT / "launch" / "train.py"), *overrides,
    ]
    return cmd, {**clean_env(), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def torchrun_popen(nproc: int, *overrides: str) -> subprocess.Popen:
    """Start launch/train.py under torchrun on CPU without waiting (stdout+stderr in one text pipe)."""
    cmd, env = _torchrun_cmd(nproc, overrides)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun(nproc: int, *overrides: str, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch/train.py under torchrun on CPU; returns the completed process."""
    cmd, env = _torchrun_cmd(nproc, overrides)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_probe(script: Path, out: Path, nproc: int, *args: str, timeout: int = 600) -> dict:
    """Run a probe script (one process, or `nproc` under torchrun) that saves its findings to `out`
    with torch.save; returns what it saved."""
    import torch

    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
    ]
    cmd = [*launcher, str(script), str(out), *args]
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{script.name} failed ({' '.join(args)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return torch.load(out, weights_only=True)


def read_metrics(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines if l.strip()]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """`cluster.data_root` with 400 synthetic samples in `synth/` (shared by e2e and distributed tests)."""
    root = tmp_path_factory.mktemp("data")
    out = root / "synth"
    subprocess.run(
        [sys.executable, "-m", "data_pipelines.synth", "--out", str(out), "--num-samples", "400",
         "--seed", "0", "--samples-per-shard", "100"],
        cwd=ROOT, check=True, capture_output=True,
    )
    return root


def megatron_one_rank_world() -> None:
    """A one-process gloo world with megatron-core's groups, for in-process model tests (idempotent)."""
    import torch
    from megatron.core import parallel_state

    from qvl_train.compat.megatron_cpu import install_cpu_compat

    install_cpu_compat()
    if not torch.distributed.is_initialized():
        # An explicit init_method, not MASTER_PORT in os.environ: subprocesses started later by other
        # tests (torchrun, convert, SLURM jobs) inherit the environment and would collide with the
        # port this process keeps listening on.
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
