"""Packing efficiency and dp compute imbalance of the step planner, on released model configs.

    python benchmarks/packing.py [--steps 20] [--samples 60000] [--seed 0] [--models qwen2_5_vl/7b ...]

Everything runs from a synthetic `index.json`-style mix held in memory (the planner never decodes
media, so no images are needed): `data.max_tokens = 16384`, max_pixels (patch·merge)²·2048 (<= 2048
visual tokens per image), dp 8 and 32, 1 and 4 micro-batches per rank per step, for each model config
of `--models` (configs/model/<generation>/<size>.yaml; default Qwen2.5-VL-7B, Qwen3-VL-8B and the
Qwen3-VL-30B-A3B MoE).

The mix (per sample): 20% text-only (chat, 30..3000 tokens, log-uniform), 5% long documents
(4k..15k text tokens with 0..3 images), 55% single-image (images 200^2..4000^2 pixels, log-uniform
area, aspect ratio 1:4..4:1 log-uniform, 20..800 text tokens), 20% multi-image (2..6 images,
50..1500 text tokens). No videos. Each entry also carries a hidden label count (documents: all their
text; chat and image samples: 20..90% of it, the answer) that the planner never sees.

Imbalance is measured in the TRUE cost of each sample: `batch_flops` of the sample on the real config
(ViT with windows, DeepStack mergers, MoE router + top-k experts, causal attention in the sample's own
length, logits at its hidden label positions); max/mean over dp ranks (and over micro-batches) per
step; the table gives the mean and the worst step, plus a lower bound for one micro-batch per rank (a
micro-batch holding the step's heaviest sample cannot weigh less than it).

Rows (all `ours/*` pack the same samples per step; only the arrangement differs):
* `prev/compute`: data.balance=compute weighted by the PREVIOUS estimate, the hard-coded 7B/8B
  `ComputeModel` that data_pipelines/packing.py held before the packer took the model's FLOP model
  (frozen here as `PrevComputeModel`, for this comparison only);
* `ours/compute`: data.balance=compute with `SampleFlops(model config)` (what train.py passes);
* `ours/tokens`, `ours/none`: balanced by tokens / not rearranged;
* `ffd-tokens`: first-fit-decreasing by tokens over windows of 4096 samples of the same stream, bins
  shuffled (seeded) and dealt j % dp, n bins per step -- a classic token-only packer.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from data_pipelines.packing import GlobalPlanner
from data_pipelines.schema import DataConfig
from qvl_train.config import LLMConfig, ModelConfig, VisionConfig
from qvl_train.monitor.flops import SampleFlops, batch_flops

BUDGET = 16384
MAX_PIXELS = 28 * 28 * 2048  # the Qwen2/2.5-VL bound (benchmarks/loader.py); per model: (patch·merge)²·2048
MODELS = Path(__file__).resolve().parents[1] / "configs" / "model"
DEFAULT_MODELS = ("qwen2_5_vl/7b", "qwen3_vl/8b", "qwen3_vl_moe/30b_a3b")


@dataclass(frozen=True)
class PrevComputeModel:
    """The previous estimate, frozen for comparison: data_pipelines/packing.py's `ComputeModel` with its
    hard-coded 7B/8B shapes (`PREV_CONSTANTS`), whatever model was trained. Forward FLOPs of a sample:
    ViT linear + full/window attention + mergers per grid, LLM linear + LM head on EVERY token + causal
    attention (2·L·d·N²) in its own length. Called like a `FlopModel`; the label count is ignored."""

    vit_hidden: int
    vit_layers: int
    vit_mlp: int
    vit_gated: bool
    vit_full_layers: int
    vit_window: int
    vit_mergers: int
    llm_hidden: int
    llm_layers: int
    llm_mlp: int
    llm_kv_dim: int
    llm_vocab: int
    patch_size: int
    merge_size: int = 2
    temporal: int = 2

    def image_flops(self, gh: int, gw: int, frames: int = 1) -> float:
        d, m = self.vit_hidden, self.merge_size
        n = gh * gw * frames
        k = 3 if self.vit_gated else 2
        linear = 2.0 * n * (3 * self.temporal * self.patch_size * self.patch_size) * d
        linear += 2.0 * n * (4 * d * d + k * d * self.vit_mlp) * self.vit_layers
        attn = 4.0 * d * frames * float(gh * gw) ** 2 * self.vit_full_layers
        if self.vit_layers - self.vit_full_layers:
            def sq(units: int) -> float:
                q, r = divmod(units, self.vit_window)
                return q * self.vit_window ** 2 + r * r
            win = frames * float(m ** 4) * sq(max(1, gh // m)) * sq(max(1, gw // m))
            attn += 4.0 * d * win * (self.vit_layers - self.vit_full_layers)
        merger = self.vit_mergers * n / (m * m) * 2.0 * ((m * m * d) ** 2 + m * m * d * self.llm_hidden)
        return linear + attn + merger

    def __call__(self, grid_thw, tokens: int, label_tokens: int) -> float:
        d, kv = self.llm_hidden, self.llm_kv_dim
        per_token = 2.0 * self.llm_layers * (d * (d + 2 * kv) + d * d + 3 * d * self.llm_mlp) + 2.0 * d * self.llm_vocab
        llm = per_token * tokens + 2.0 * self.llm_layers * d * float(tokens) ** 2
        return llm + sum(self.image_flops(h, w, t) for t, h, w in grid_thw)


PREV_CONSTANTS = {  # generation -> the ComputeModel constants the packer used (the MoE shared the 8B's)
    "qwen2_5_vl": PrevComputeModel(1280, 32, 3420, True, 4, 4, 1, 3584, 28, 18944, 512, 152064, patch_size=14),
    "qwen3_vl": PrevComputeModel(1152, 27, 4304, False, 27, 0, 4, 4096, 36, 12288, 1024, 151936, patch_size=16),
    "qwen3_vl_moe": PrevComputeModel(1152, 27, 4304, False, 27, 0, 4, 4096, 36, 12288, 1024, 151936, patch_size=16),
}


def model_yaml(name: str) -> ModelConfig:
    """A released model's config from configs/model/<name>.yaml."""
    d = yaml.safe_load((MODELS / f"{name}.yaml").read_text())
    return ModelConfig(vision=VisionConfig(**d.pop("vision", {})), llm=LLMConfig(**d.pop("llm", {})), **d)


def _logu(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _image(rng: random.Random) -> list[int]:
    area = _logu(rng, 200 * 200, 4000 * 4000)
    ar = _logu(rng, 0.25, 4.0)  # w / h
    h = max(1, int(round(math.sqrt(area / ar))))
    w = max(1, int(round(math.sqrt(area * ar))))
    return [h, w]


def synthetic_index(n: int, seed: int, per_shard: int = 1000) -> dict:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        u = rng.random()
        if u < 0.20:
            text, imgs = int(_logu(rng, 30, 3000)), []
        elif u < 0.25:
            text, imgs = int(rng.uniform(4000, 15000)), [_image(rng) for _ in range(rng.randint(0, 3))]
        elif u < 0.80:
            text, imgs = int(_logu(rng, 20, 800)), [_image(rng)]
        else:
            text, imgs = int(_logu(rng, 50, 1500)), [_image(rng) for _ in range(rng.randint(2, 6))]
        labels = text if 0.20 <= u < 0.25 and not imgs else max(1, int(text * rng.uniform(0.2, 0.9)))
        samples.append({"id": f"b{i}", "key": f"{i:06d}", "n_text_tokens": text, "images": imgs, "_labels": labels})
    shards = [
        {"name": f"shard-{k:06d}.tar", "samples": samples[a : a + per_shard]}
        for k, a in enumerate(range(0, n, per_shard))
    ]
    return {"version": 1, "shards": shards}


def _cfg(model: ModelConfig, balance: str) -> DataConfig:
    patch, merge = model.vision.patch_size, model.vision.spatial_merge_size
    return DataConfig(max_tokens=BUDGET, generation=model.generation, patch_size=patch, merge_size=merge,
                      max_pixels=(patch * merge) ** 2 * 2048, balance=balance, seed=0)


def _imb(x: np.ndarray) -> float:
    return float(x.max() / x.mean())


class TrueCost:
    """`batch_flops` forward of one sample on the real config, with its hidden label count."""

    def __init__(self, model: ModelConfig, planner: GlobalPlanner):
        self.model, self.planner, self.cache = model, planner, {}

    def __call__(self, ref) -> float:
        c = self.cache.get(ref)
        if c is None:
            grids, tokens, _ = self.planner.flop_inputs(ref)
            labels = min(self.planner.entry(ref)["_labels"], tokens)
            c = self.cache[ref] = float(batch_flops(self.model, grids, [tokens], labels).forward)
        return c


def _measure(plans: list, dp: int, true: TrueCost, planner: GlobalPlanner, n: int) -> tuple:
    mb = np.array([sum(true(r) for r in p) for p in plans])
    ranks = np.array([mb[r::dp].sum() for r in range(dp)])
    heaviest = max(true(r) for p in plans for r in p)
    eff = sum(planner.cost(r) for p in plans for r in p) / (n * BUDGET)
    return eff, _imb(ranks), _imb(mb), max(heaviest, mb.mean()) / mb.mean()


def run_ours(model: ModelConfig, index: dict, balance: str, flop_model, dp: int, k: int, steps: int) -> dict:
    planner = GlobalPlanner(_cfg(model, balance), [index], flop_model)
    true = TrueCost(model, planner)
    n = dp * k
    rows = []
    t0 = time.perf_counter()
    for _ in range(steps):
        plans = planner.next_step(n)
        for p in plans:
            assert sum(planner.cost(r) for r in p) <= BUDGET
        rows.append(_measure(plans, dp, true, planner, n))
    ms = 1e3 * (time.perf_counter() - t0) / steps  # planning + measuring (true costs are cached like the plan's)
    eff, dpi, mbi, bound = map(np.array, zip(*rows))
    return {"eff": eff.mean(), "dp": dpi.mean(), "dp_max": dpi.max(), "mb": mbi.mean(), "ms": ms, "bound": bound.mean()}


def run_ffd(model: ModelConfig, index: dict, dp: int, k: int, steps: int, seed: int) -> dict:
    """Token-only first-fit-decreasing over windows of the same shuffled stream the planner reads."""
    planner = GlobalPlanner(_cfg(model, "none"), [index])  # only for its stream order and cost()
    true = TrueCost(model, planner)
    n = dp * k
    bins: list[list] = []
    rng = random.Random(seed)
    rows = []
    t0 = time.perf_counter()
    for _ in range(steps):
        while len(bins) < n:
            window = [planner._draw_usable() for _ in range(4096)]
            window.sort(key=lambda r: -planner.cost(r))
            new: list[list] = []
            free: list[int] = []
            for r in window:
                c = planner.cost(r)
                for b in range(len(new)):
                    if free[b] >= c:
                        new[b].append(r)
                        free[b] -= c
                        break
                else:
                    new.append([r])
                    free.append(BUDGET - c)
            rng.shuffle(new)
            bins.extend(new)
        step, bins = bins[:n], bins[n:]
        rows.append(_measure(step, dp, true, planner, n))
    eff, dpi, mbi, _ = map(np.array, zip(*rows))
    return {"eff": eff.mean(), "dp": dpi.mean(), "dp_max": dpi.max(), "mb": mbi.mean(),
            "ms": 1e3 * (time.perf_counter() - t0) / steps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--dp", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--mb", type=int, nargs="+", default=[1, 4], help="micro-batches per rank per step")
    args = ap.parse_args(argv)
    index = synthetic_index(args.samples, args.seed)
    for name in args.models:
        model = model_yaml(name)
        new, prev = SampleFlops(model), PREV_CONSTANTS[model.generation]
        probe = GlobalPlanner(_cfg(model, "none"), [{"version": 1, "shards": [{"name": "p", "samples": [
            {"id": "p", "key": "0", "n_text_tokens": 0, "images": [[1000, 1000]]}]}]}], new)
        grids, vt, _ = probe.flop_inputs((0, 0, 0))
        print(f"\n## {name} ({model.generation}): {args.samples} samples, budget {BUDGET}; a visual token costs "
              f"{new(grids, vt, 0) / new([], vt, 0):.2f}x a text token (1000x1000 image; previous estimate "
              f"{prev(grids, vt, 0) / prev([], vt, 0):.2f}x)")
        print(f"{'dp':>3} {'mb/rank':>7} {'packer':<13} {'efficiency':>10} {'dp_imb mean':>11} {'dp_imb max':>10} "
              f"{'mb_imb mean':>11} {'ms/step':>8} {'1-mb bound':>10}")
        for dp in args.dp:
            for k in args.mb:
                steps = args.steps if dp * k <= 32 else max(5, args.steps // 4)
                rows = [("prev/compute", run_ours(model, index, "compute", prev, dp, k, steps)),
                        ("ours/compute", run_ours(model, index, "compute", new, dp, k, steps))]
                rows += [(f"ours/{b}", run_ours(model, index, b, new, dp, k, steps)) for b in ("tokens", "none")]
                rows.append(("ffd-tokens", run_ffd(model, index, dp, k, steps, args.seed)))
                for label, r in rows:
                    print(f"{dp:>3} {k:>7} {label:<13} {r['eff']:>10.4f} {r['dp']:>11.4f} {r['dp_max']:>10.4f} "
                          f"{r['mb']:>11.4f} {r['ms']:>8.1f} {r.get('bound', float('nan')):>10.4f}", flush=True)
    print(f"\n(steps per config: {args.steps}; {max(5, args.steps // 4)} where dp*mb/rank > 32. Imbalance of the true"
          " cost: batch_flops on the real config with each sample's hidden label count. '1-mb bound': mean over steps"
          " of max(heaviest single sample, mean micro-batch) / mean micro-batch, the least mb_imbalance any"
          " arrangement of the step's samples can reach)")


if __name__ == "__main__":
    main()
