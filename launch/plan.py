"""Layout planner: the fastest parallel layouts that fit, with predicted memory and step time.

    python launch/plan.py +experiment=qwen3vl_235b_thinking cluster.gpus=256 cluster.gpu=h100
    python launch/plan.py +experiment=qwen2_5vl_72b cluster.gpus=64 --top 8
    python launch/plan.py --experiments        # every cluster experiment's own layout, checked

Takes the same Hydra overrides as launch/train.py (model, data.max_tokens, train.global_batch_tokens,
cluster.gpus / gpus_per_node / gpu) and prints: the best few layouts, the experiment's own layout
(`parallel.*`) with its prediction, and why the first choice wins. The analytic model is
`qvl_train/tools/planner.py`; its memory figures are checked in benchmarks/plan_memory.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from qvl_train.config import ConfigError, TrainConfig, register_configs, to_train_config  # noqa: E402
from qvl_train.tools.planner import GPUS, Layout, Workload, check_layout, plan, predict, table  # noqa: E402

# Published recipes to compare with (layout, GPUs, source).
RECIPES = {
    "qwen3_vl_moe/235b_a22b": (
        Layout(tp=2, pp=8, vpp=4, ep=32, etp=1, cp=1, dp=16, recompute="selective"), 256,
        "Megatron recipe for Qwen3-235B-A22B on 256 H100 (TP2 PP8 VPP4 EP32)",
    ),
}


def _compose(overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=overrides))


def _own_layout(cfg: TrainConfig, world: int) -> Layout:
    p = cfg.parallel
    dp = max(1, world // (p.tp * p.pp * p.cp))
    return Layout(p.tp, p.pp, p.vpp, p.ep, p.etp, p.cp, dp, cfg.train.recompute)


def _workload(cfg: TrainConfig, args) -> Workload:
    # causal attention FLOPs grow with each sample's own length; by default the whole micro-batch is
    # one sample (an upper bound: the step time is not underestimated for long-context data)
    sample = args.sample_tokens or cfg.data.max_tokens
    return Workload(cfg.data.max_tokens, cfg.train.global_batch_tokens, args.visual_share, args.label_share,
                    sample_tokens=sample, image_patches=args.image_patches)


def report(cfg: TrainConfig, args, name: str) -> int:
    world, gpu = cfg.cluster.gpus, GPUS.get(cfg.cluster.gpu)
    if gpu is None:
        raise ConfigError(f"cluster.gpu={cfg.cluster.gpu!r}; known: {', '.join(GPUS)}")
    if world < 1:
        raise ConfigError("give the job's GPU count: cluster.gpus=N (e.g. cluster.gpus=256)")
    work = _workload(cfg, args)
    print(f"# {name}: {cfg.model.generation}, {world} × {gpu.name}, micro-batch {work.micro_tokens} tokens, "
          f"step {work.global_tokens:,} tokens\n")
    best = plan(cfg.model, world, work, gpu, cfg.cluster.gpus_per_node, top=args.top)
    own = _own_layout(cfg, world)
    problem = check_layout(cfg.model, own, work, cfg.cluster.gpus_per_node)
    own_pred = None if problem else predict(cfg.model, own, work, gpu, cfg.cluster.gpus_per_node)
    if best:
        print("## Fastest layouts that fit\n" + table(best, gpu) + "\n")
    else:
        print("## No layout fits: more GPUs, a smaller data.max_tokens, or a GPU with more memory\n")
    print("## This experiment's layout (parallel.*)")
    print(f"{own}: {problem}\n" if problem else table([own_pred], gpu) + "\n")
    recipe = RECIPES.get(args.model_key)
    if recipe and recipe[1] == world:
        lo, _, source = recipe
        rows = [predict(cfg.model, replace(lo, recompute=r), work, gpu, cfg.cluster.gpus_per_node) for r in ("selective", "full")]
        print(f"## Published: {source}\n" + table(rows, gpu) + "\n")
    if best:
        b = best[0]
        m, t = b.memory_gib, b.time_s
        print(f"Why {b.layout}: predicted {m['total']:.0f} of {gpu.memory_gib:g} GiB on the first stage "
              f"(activations {m['activations']:.0f} GiB for {b.layout.pp if b.layout.vpp == 1 else 'interleaved'} in-flight "
              f"micro-batches), pipeline bubble {t['bubble'] / b.step_s:.0%}, exposed communication "
              f"{(t['tp_comm'] + t['ep_comm'] + t['dp_comm']) / b.step_s:.0%} of the step; "
              f"{b.tokens_per_gpu_s:,.0f} tokens/s per GPU at {b.mfu:.0%} MFU.")
    return 0 if (own_pred is None or own_pred.fits) and best else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch/train.py")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--visual-share", type=float, default=0.5, help="share of LLM tokens that are visual")
    ap.add_argument("--label-share", type=float, default=0.5, help="share of tokens carrying loss")
    ap.add_argument("--sample-tokens", type=float, default=0,
                    help="E[s²]/E[s] of the packed samples' lengths (attention FLOPs); default data.max_tokens")
    ap.add_argument("--image-patches", type=float, default=1024, help="ViT patches of a typical image")
    ap.add_argument("--experiments", action="store_true", help="check every cluster experiment's own layout")
    args = ap.parse_args(argv)
    try:
        if not args.experiments:
            cfg = _compose(args.overrides)
            args.model_key = next((o.split("=", 1)[1] for o in args.overrides if o.startswith(("model=", "+model="))), "")
            args.model_key = args.model_key or _model_key(args.overrides)
            return report(cfg, args, " ".join(args.overrides) or "train.yaml")
        worst = 0
        for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
            if path.stem.startswith("tiny"):
                continue
            overrides = [f"+experiment={path.stem}", *args.overrides]
            cfg = _compose(overrides)
            if cfg.cluster.gpus < 1:
                print(f"# {path.stem}: no cluster.gpus in the experiment; skipped\n")
                continue
            args.model_key = _model_key(overrides)
            worst = max(worst, report(cfg, args, path.stem))
            print()
        return worst
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


def _model_key(overrides: list[str]) -> str:
    """`qwen3_vl_moe/235b_a22b` for an experiment that overrides /model with it (for RECIPES)."""
    for o in overrides:
        if o.startswith("+experiment="):
            text = (ROOT / "configs" / "experiment" / f"{o.split('=', 1)[1]}.yaml").read_text()
            for line in text.splitlines():
                if "override /model:" in line:
                    return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.exit(main())
