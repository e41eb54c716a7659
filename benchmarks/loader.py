"""Loader throughput per worker (StepLoader: read + decode + preprocess + pack) vs what training consumes.

    python benchmarks/loader.py [--samples 400] [--steps 8] [--step-tokens 7984 --step-time 0.194]

One worker = one process running `StepLoader.next_step()` for a whole step (dp 1, all micro-batches),
as each training rank does. On synthetic shards written first into a temporary directory
(`data_pipelines.synth`: PNG images with text, 20% text-only), per image-size setting:

* `plan ms`: GlobalPlanner step planning (index only; done ahead in a thread with data.plan_ahead);
* `read ms`: streaming the needed tar members with WebDataset;
* `build ms`: JSON, image decode + resize + patchify (vision.py), template + tokens (text.py),
  M-RoPE positions, then `pack` into PackedBatch;
* `samples/s`, `tokens/s` (real tokens, text + visual, of the packed batches), `img/s` per worker;
* `workers/GPU`: how many such workers one GPU needs to be fed at the given consumption rate
  (`--step-tokens` per `--step-time` seconds; default: the H100 step of benchmarks/RESULTS.md,
  7,984 tokens in 0.194 s = 41,160 tokens/s for a 1.15B Qwen2-VL-shaped model).

Then planning ahead: GlobalPlanner at dp 32 x 4 micro-batches of 16,384 tokens on the realistic
index of benchmarks/packing.py (no media), with a simulated training step of `--sim-step` seconds
(sleep, which releases the GIL like CUDA work mostly does): how long `next_step` waits for its plan,
inline vs planned ahead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines.schema import DataConfig, DataSource  # noqa: E402
from data_pipelines.shards import write_index  # noqa: E402
from data_pipelines.stream import StepLoader  # noqa: E402
from data_pipelines.synth import generate  # noqa: E402

SIZES = {"small 56-224 px": (56, 224), "medium 224-672 px": (224, 672), "large 448-1344 px": (448, 1344)}


class _Timed:
    """Wraps a callable and sums its wall time."""

    def __init__(self, fn):
        self.fn, self.total = fn, 0.0

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.total += time.perf_counter() - t


def measure(data_dir: str, *, max_tokens: int, micro: int, steps: int, generation: str) -> dict[str, float]:
    """Time `steps` steps of one worker (after one warm-up step); phases summed over all steps."""
    cfg = DataConfig(sources=[DataSource(data_dir)], max_tokens=max_tokens, generation=generation, plan_ahead=False)
    ld = StepLoader(cfg, micro_batches_per_step=micro, dp_rank=0, dp_size=1)
    ld.next_step()
    plan, read = _Timed(ld._take_plan), _Timed(ld._read)
    ld._take_plan, ld._read = plan, read  # instance attributes shadow the methods
    samples = tokens = images = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        for b in ld.next_step():
            samples += b.num_samples
            tokens += b.num_tokens
            images += int(b.grid_thw.shape[0])
    wall = time.perf_counter() - t0
    return {
        "plan_ms": 1e3 * plan.total / steps, "read_ms": 1e3 * read.total / steps,
        "build_ms": 1e3 * (wall - plan.total - read.total) / steps,
        "samples_s": samples / wall, "tokens_s": tokens / wall, "images_s": images / wall,
        "tokens_step": tokens / steps, "skipped": ld.stats()["data_skipped"],
    }


def plan_overlap(sim_step: float, steps: int) -> list[tuple[str, float, float]]:
    """Mean seconds `next_step` spends obtaining its plan at dp32 x 4, inline vs planned ahead."""
    from benchmarks.packing import BUDGET, MAX_PIXELS, synthetic_index

    out = []
    with tempfile.TemporaryDirectory() as d:
        write_index(d, synthetic_index(20000, 0)["shards"])
        for ahead in (False, True):
            cfg = DataConfig(sources=[DataSource(d)], max_tokens=BUDGET, max_pixels=MAX_PIXELS,
                             generation="qwen2_5_vl", plan_ahead=ahead)
            ld = StepLoader(cfg, micro_batches_per_step=128, dp_rank=0, dp_size=32)
            waits = []
            for i in range(steps + 1):
                t = time.perf_counter()
                ld._take_plan()  # the planning part of next_step (no shard exists here to read)
                if i:
                    waits.append(time.perf_counter() - t)
                time.sleep(sim_step)  # the training step
            ld.close()
            out.append(("ahead" if ahead else "inline", statistics.mean(waits), max(waits)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=400, help="synthetic samples per size setting")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row (after one warm-up step)")
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--max-tokens", type=int, default=4096, help="data.max_tokens")
    ap.add_argument("--generation", default="qwen2_vl")
    ap.add_argument("--step-tokens", type=int, default=7984, help="tokens one GPU consumes per training step")
    ap.add_argument("--step-time", type=float, default=0.194, help="seconds of that training step")
    ap.add_argument("--sim-step", type=float, default=1.0, help="simulated step (s) of the plan-ahead part; 0 skips it")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated rows of: " + ", ".join(SIZES))
    args = ap.parse_args(argv)
    need = args.step_tokens / args.step_time
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"worker = 1 process, dp 1, {args.micro} x {args.max_tokens}-token micro-batches per step, "
          f"{args.generation}; consumption {need:,.0f} tokens/s per GPU ({args.step_tokens} tokens / "
          f"{args.step_time} s); load average {load:.1f}")
    print(f"{'images':<18} {'plan ms':>8} {'read ms':>8} {'build ms':>9} {'samples/s':>10} {'tokens/s':>9} "
          f"{'img/s':>7} {'workers/GPU':>11}")
    results = {}
    for name in args.sizes.split(","):
        lo, hi = SIZES[name]
        with tempfile.TemporaryDirectory() as d:
            generate(d, args.samples, seed=0, samples_per_shard=100, min_side=lo, max_side=hi)
            r = measure(d, max_tokens=args.max_tokens, micro=args.micro, steps=args.steps, generation=args.generation)
        results[name] = r
        print(f"{name:<18} {r['plan_ms']:>8.1f} {r['read_ms']:>8.1f} {r['build_ms']:>9.1f} {r['samples_s']:>10.1f} "
              f"{r['tokens_s']:>9,.0f} {r['images_s']:>7.1f} {math.ceil(need / r['tokens_s']):>11d}", flush=True)
    if args.sim_step > 0:
        print(f"planning dp32 x 4 micro-batches, 16,384 tokens, qwen2_5_vl, simulated step {args.sim_step} s:")
        for mode, mean, worst in plan_overlap(args.sim_step, steps=5):
            print(f"  {mode:<7} plan wait per step: mean {1e3 * mean:7.1f} ms, max {1e3 * worst:7.1f} ms", flush=True)
    print(json.dumps({"consumption_tokens_s": need, "rows": results}))


if __name__ == "__main__":
    main()
