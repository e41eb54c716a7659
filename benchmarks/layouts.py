"""Step time of the same training run in every parallel layout, side by side in one invocation.

    python benchmarks/layouts.py [--experiment tiny_qwen3_vl] [--steps 12] [--layouts single,dp2,tp2,...] [KEY=VALUE ...]

Extra KEY=VALUE overrides apply to every layout (e.g. `model.llm.num_layers=6`, which pp2_vpp2 needs:
4 model chunks, the first holding both DeepStack layers). The MoE layouts (ep2, ep2_zero1, tp2_sp_ep2, cp2_ep2, ep2_lora) take
`--experiment tiny_qwen3_vl_moe` (which also runs pp2_vpp2 with `model.llm.num_layers=6`).

Each layout trains the experiment for `--steps` optimizer steps from the same seed on the same
synthetic shards (`data.max_tokens=1024`, 2 micro-batches per step) and reports the median step time
and tokens/s over the steps after the first two (start-up and allocation), plus the final loss,
which must agree across layouts (they compute the same step). On a CPU box this measures the cost of
each layout's communication and duplicated work at toy size, not GPU speed-ups.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYOUTS = {
    "single": (1, []),
    "dp2": (2, []),
    "dp2_zero1": (2, ["optim.distributed=true"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2": (2, ["parallel.pp=2", "parallel.first_stage_layers=2"]),
    "dp2_ds_zero2": (2, ["engine=deepspeed"]),
    "dp2_ds_zero3": (2, ["engine=deepspeed", "engine.zero_stage=3"]),
    "cp2": (2, ["parallel.cp=2"]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=4"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.first_stage_layers=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    "ep2_zero1": (2, ["parallel.ep=2", "optim.distributed=true"]),
    "tp2_sp_ep2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]),
    "cp2_pp2": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.first_stage_layers=2"]),
    "cp2_ep2": (2, ["parallel.cp=2", "parallel.ep=2"]),
    "ep2_lora": (2, ["parallel.ep=2", "model.lora.rank=8"]),
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, nproc: int, layout: list[str], args, data_root: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(ROOT / "launch" / "train.py")] if nproc > 1 else [sys.executable, str(ROOT / "launch" / "train.py")]
    cmd += [f"+experiment={args.experiment}", f"cluster.data_root={data_root}", f"output_dir={out / name}",
            f"train.max_steps={args.steps}", "data.max_tokens=1024", "train.global_batch_tokens=2048",
            "checkpoint.every=0", "wandb.mode=disabled", "train.log_every=1", *args.overrides, *layout]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r.get("kind") == "train"]
    steady = rows[2:] or rows
    return {
        "step_s": statistics.median(r["step_time_s"] for r in steady),
        "tok_s": statistics.median(r["tokens_per_s"] for r in steady),
        "loss": rows[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="tiny_qwen3_vl")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--layouts", default="single,dp2,dp2_zero1,tp2,tp2_sp,pp2,dp2_ds_zero2,dp2_ds_zero3,cp2",
                    help=f"comma-separated subset of {','.join(LAYOUTS)}")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every layout")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qvl_layouts_"))
    data_root = work / "data"
    subprocess.run([sys.executable, "-m", "data_pipelines.synth", "--out", str(data_root / "synth"), "--num-samples", "400",
                    "--seed", "0"], cwd=ROOT, check=True, capture_output=True)
    try:
        results = {name: run(name, *LAYOUTS[name], args, data_root, work) for name in args.layouts.split(",")}
    finally:
        shutil.rmtree(work, ignore_errors=True)  # every layout's checkpoints: hundreds of MB each
    base = results.get("single")
    print(f"{args.experiment} {' '.join(args.overrides)}, {args.steps} steps of 2×1024 tokens, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'layout':10s} {'procs':>5s} {'step s':>8s} {'tokens/s':>9s} {'vs single':>9s} {'final loss':>11s}")
    for name, r in results.items():
        ratio = f"{base['step_s'] / r['step_s']:.2f}×" if base else "-"
        print(f"{name:10s} {LAYOUTS[name][0]:5d} {r['step_s']:8.3f} {r['tok_s']:9.0f} {ratio:>9s} {r['loss']:11.6f}")


if __name__ == "__main__":
    main()
