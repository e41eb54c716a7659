"""CLI: `python -m data_pipelines.synth --out DIR --num-samples N [--seed S] [--samples-per-shard K]
[--min-side A --max-side B] [--video-fraction F]`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from data_pipelines.synth.factory import generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipelines.synth", description=__doc__)
    ap.add_argument("--out", required=True, help="output shard directory (created)")
    ap.add_argument("--num-samples", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples-per-shard", type=int, default=500)
    ap.add_argument("--min-side", type=int, default=56, help="smallest image side in pixels")
    ap.add_argument("--max-side", type=int, default=224, help="largest image side in pixels")
    ap.add_argument("--video-fraction", type=float, default=0.0,
                    help="fraction of samples that are short synthetic videos (default 0: images and text only)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    summary = generate(
        args.out,
        args.num_samples,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        min_side=args.min_side,
        max_side=args.max_side,
        video_fraction=args.video_fraction,
    )
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    print(
        f"wrote {summary['samples']} samples ({summary['images']} images) in {len(summary['shards'])} shards "
        f"to {args.out} in {summary['seconds']} s; kinds: {json.dumps(summary['kinds'], sort_keys=True)}; "
        f"{summary['thinking']} with reasoning"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
