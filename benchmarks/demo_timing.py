"""Time what a new user waits for: install into a fresh venv, shard building, the tiny demo run.

    python benchmarks/demo_timing.py [--skip-install] [--steps 200] [--nproc 2]

Prints a table; copy it into benchmarks/RESULTS.md with the machine it ran on. The install uses
the same command as `make setup` (pip's cache makes a second install faster than a first one on a
new machine; say which one you measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-install", action="store_true")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="qvl_bench_"))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if not args.skip_install:
        venv = work / "venv"
        t = timed([sys.executable, "-m", "venv", str(venv)])
        t += timed([str(venv / "bin/python"), "-m", "pip", "install", "-q", "-c", "constraints.txt", "-e", ".[test]"], **quiet)
        rows.append(("install (fresh venv, pinned stack)", f"{t:.0f} s"))
    py = sys.executable
    t = timed([py, "-m", "data_pipelines.synth", "--out", str(work / "synth"), "--num-samples", "2000", "--seed", "0"], **quiet)
    rows.append(("synthetic shards (2,000 samples)", f"{t:.1f} s"))
    out = work / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = timed([py, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "launch/train.py",
               "+experiment=tiny", f"output_dir={out}", f"cluster.data_root={work}", f"train.max_steps={args.steps}",
               "wandb.mode=offline"], env=env, **quiet)
    rows.append((f"demo run ({args.steps} steps, {args.nproc} processes, incl. start-up and 2 checkpoints)", f"{t:.0f} s"))
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["step_time_s"] for r in recs[5:]]
    rows.append(("step time (median after step 5)", f"{statistics.median(steady):.3f} s"))
    rows.append(("tokens/s (median, real tokens, all ranks)", f"{statistics.median(r['tokens_per_s'] for r in recs[5:]):,.0f}"))
    first = statistics.mean(r["loss"] for r in recs[:10])
    last = statistics.mean(r["loss"] for r in recs[-10:])
    rows.append(("loss, mean of first 10 -> last 10 steps", f"{first:.3f} -> {last:.3f}"))
    rows.append(("packing efficiency (mean)", f"{statistics.mean(r['packing_efficiency'] for r in recs):.1%}"))
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    width = max(len(k) for k, _ in rows)
    print(f"| {'what':<{width}} | measured |\n|{'-' * (width + 2)}|----------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")


if __name__ == "__main__":
    main()
