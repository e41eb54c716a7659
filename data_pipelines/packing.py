"""The global stream plan: which samples form each packed micro-batch, from `index.json` alone.

Every data-parallel rank runs this planner identically (it is cheap: no tar is opened, no image
decoded), so all ranks agree on the whole global stream; a rank then decodes only the micro-batches
dealt to it (see stream.py). That is what makes the samples of a step independent of the dp size
and makes resume exact under a dp change: the plan's state is global, not per rank.

Order
-----
Per source and epoch: a permutation of the shard order and, inside each shard, of its samples,
seeded by (data.seed, source, epoch[, shard]) when `data.shuffle`, else file order. When a source
runs out, its epoch counter increases and it starts over with a new permutation. Several sources
are blended per sample: draw number d picks a source with `Random((seed, d))` weighted by
`DataSource.weight`, so the mixture depends only on the seed and the draw counter.

A source that runs out is reported once per new epoch (`pop_epoch_events`, logged by the loader);
the mixture draw does not depend on epochs, so the weights hold across them.

Cost and packing
----------------
A sample's cost is its text tokens under `data.generation` (`shards.text_tokens`) +
`sum(image_token_count(h, w))` under the pixel bounds of its source (`DataSource.max_pixels`, else
`data.max_pixels`), recomputed from the stored image sizes. Each source has a token limit
(`token_budget`: `DataSource.max_tokens`, else `data.max_tokens`; see `capped_cost`): a text-only
sample (no images or videos in the index) over it is planned at the limit and truncated when read
(the loader keeps its first tokens, counted as `data_truncated`), so plan and loader agree on its
length without decoding anything; a sample with media over it is dropped here and counted as `too_long`.
Micro-batches are packed greedily with a small lookahead buffer (`data.pack_lookahead` candidates):
a micro-batch starts with the oldest candidate (so no sample waits forever and the order stays
close to the shuffled stream), then repeatedly takes the candidate with the largest cost that still
fits (best fit; ties to the oldest), refilling the buffer after each take, until nothing fits.

Steps and compute balancing (`data.balance`)
--------------------------------------------
`next_step(n)` plans one optimizer step: n micro-batches packed exactly as above (so the SET of
samples of the step, the packing efficiency and the planner state do not depend on balancing or
on the dp size), then rearranges those samples among the step's micro-batches:

* `compute` (default): weight = forward FLOPs of the sample under the model being trained, from the
  index alone (`GlobalPlanner.flops`). The FLOP model is not computed here: the data side never
  imports `qvl_train` and holds no architecture numbers, so whoever builds the planner hands in a
  `flop_model(grid_thw, tokens, label_tokens) -> FLOPs` callable; training passes
  `qvl_train.monitor.flops.SampleFlops(cfg.model)`, the very `batch_flops` that MFU counts (ViT with
  its windows, mergers incl. DeepStack or the resampler, LLM linear with MoE router + top-k experts,
  causal attention in the sample's own length, logits at label positions). Built without one (data
  tools, tests), `compute` balances tokens, like `tokens`;
* `tokens`: weight = the sample's tokens;
* `none`: the micro-batches stay as packed (the order of the stream).

Balancing is a local search that repeatedly lowers the heaviest micro-batch: it exchanges a group of
0-2 of its samples with a group of 0-2 samples of a lighter micro-batch (moves, swaps, two-for-one),
choosing the change that brings the pair closest to equal, and only if both micro-batches stay
within `data.max_tokens` (the budget stays a hard limit; see `balance_step`).
Then the micro-batches are ordered by weight, descending s_0 >= s_1 >= ... >= s_{n-1}, and "folded":
position j < n/2 holds s_j and position j + n/2 holds s_{n-1-j}. With the deal "micro-batch j to dp
rank j % dp" (stream.py), every rank whose dp divides n/2 receives complementary pairs
(s_j, s_{n-1-j}) -- the same rank sums as a snake deal -- while the plan (each micro-batch's samples
and their order) stays identical for every dp, so exact resume across a dp change is unaffected.
Everything here is deterministic and computed identically on every rank.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from data_pipelines import generations
from data_pipelines.schema import DataConfig
from data_pipelines.shards import text_tokens
from data_pipelines.video import BadVideo, VideoMeta, VideoPlan, VideoSettings, video_plan
from data_pipelines.vision import planned_image_tokens, smart_resize

STATE_VERSION = 1
Ref = tuple[int, int, int]
"""(source index, shard index in index.json, sample index in that shard)."""


def _rng(*parts: Any) -> random.Random:
    """A Random seeded by a stable string of `parts` (Python's str seeding hashes with SHA-512)."""
    return random.Random(":".join(str(p) for p in parts))


# ------------------------------------------------------------------------------ compute estimate
FlopModel = Callable[[Sequence[tuple[int, int, int]], int, int], float]
"""`flop_model(grid_thw, tokens, label_tokens) -> forward FLOPs` of ONE sample: its media grids `(t, h, w)`
in patches (an image is t = 1), its LLM tokens (text + visual) and its label tokens. Built on the
training side from the model config (`qvl_train.monitor.flops.SampleFlops`); it must pickle (a
module-level class or function) when the planner crosses into another process."""


BALANCE_MODES = ("compute", "tokens", "none")


def image_grid(
    height: int, width: int, *, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int
) -> tuple[int, int, int]:
    """Patch grid `(1, h, w)` of one image of source size (height, width) under dynamic resolution
    (`smart_resize` to a multiple of patch·merge within the pixel bounds), from the index alone."""
    rh, rw = smart_resize(int(height), int(width), patch_size * merge_size, min_pixels, max_pixels)
    return (1, rh // patch_size, rw // patch_size)


def capped_cost(tokens: int, has_media: bool, limit: int) -> int:
    """Planned tokens of a sample under a token limit (`DataSource.max_tokens` or `data.max_tokens`).

    A text-only sample over the limit is truncated to it when read, so it costs the limit; a sample
    with media is never cut (an image is never split), so its cost stays over the limit and the
    planner rejects it. The loader truncates with `stream.truncate_text_sample` to the same limit.
    """
    return limit if tokens > limit and not has_media else tokens


PAIR_POOL = 32
"""Pairs are formed among at most this many samples of a micro-batch (its heaviest): the exchange
matrices grow with the square of the group count, and micro-batches of many small samples (chat at a
16k budget: hundreds) balance finely with single moves already."""


def is_text_only(entry: dict[str, Any]) -> bool:
    """An index entry without images or videos (the only kind of sample that may be truncated)."""
    return not entry["images"] and not entry.get("videos")
def entry_video_plans(cfg: DataConfig, entry: dict[str, Any]) -> list[VideoPlan]:
    """Frames and grids of an index entry's videos (`videos: [[frames, fps, h, w]]`) under the run's
    `data.video_*` settings; raises BadVideo for a video these settings cannot sample."""
    settings = VideoSettings.from_config(cfg)
    return [
        video_plan(VideoMeta.from_index(row), cfg.generation, settings, patch_size=cfg.patch_size,
                   merge_size=cfg.merge_size, temporal_patch_size=cfg.temporal_patch_size)
        for row in entry.get("videos", ())
    ]


def _groups(items: list[Any], weight, tokens, pairs: bool) -> tuple[list[tuple[int, ...]], np.ndarray, np.ndarray]:
    """Exchangeable groups of one micro-batch: (), each sample, and (if `pairs`) each pair of samples
    among its `PAIR_POOL` heaviest (all pairs when it holds no more samples than that)."""
    k = len(items)
    groups: list[tuple[int, ...]] = [()] + [(i,) for i in range(k)]
    if pairs:
        pool = sorted(sorted(range(k), key=lambda i: (-weight[items[i]], i))[:PAIR_POOL])
        groups += [(i, j) for a, i in enumerate(pool) for j in pool[a + 1 :]]
    w = np.array([weight[items[i]] for i in range(k)] + [0.0], dtype=np.float64)
    t = np.array([tokens[items[i]] for i in range(k)] + [0], dtype=np.int64)
    idx = np.array([(g + (k, k))[:2] for g in groups], dtype=np.int64)  # k = the zero entry
    return groups, w[idx].sum(1), t[idx].sum(1)


def balance_step(
    plans: list[list[Any]], weight: Sequence[float] | dict, tokens: dict, budget: int, *, max_rounds: Optional[int] = None
) -> list[list[Any]]:
    """Rearrange the samples of a step's micro-batches so their summed `weight` is as even as possible.

    `plans`: micro-batches (lists of hashable sample refs); `weight[ref]`, `tokens[ref]`. Every change
    keeps each micro-batch's tokens <= `budget` and no micro-batch empty; the set of samples is kept.
    Each round exchanges a group of 0-2 samples of the heaviest micro-batch with a group of 0-2
    samples of a lighter one (the lightest first), choosing the exchange that makes the pair closest
    to equal, only if it lowers the pair's maximum; pairs of samples are tried once single-sample
    moves and swaps are exhausted (micro-batches packed to ~99.8% of the budget leave little room, and
    two-for-one exchanges free it), for at most 8n + 64 pair-phase comparisons and only for steps of
    <= 64 micro-batches (with more, each rank sums several micro-batches and single exchanges already
    reach ~1.01). Returns new lists "folded" by weight (module docstring). Deterministic (same float
    operations on every rank).
    """
    n = len(plans)
    plans = [list(p) for p in plans]
    if n > 1:
        loads = [sum(weight[r] for r in p) for p in plans]
        toks = [sum(tokens[r] for r in p) for p in plans]
        rounds = max_rounds if max_rounds is not None else 40 * n + 100
        pairs = False
        cache: dict[tuple[int, bool], tuple] = {}

        def groups(k: int) -> tuple:
            g = cache.get((k, pairs))
            if g is None:
                g = _groups(plans[k], weight, tokens, pairs)
                cache[(k, pairs)] = g + (np.array([len(x) for x in g[0]]),)
                g = cache[(k, pairs)]
            return g

        pair_work = 8 * n + 64 if n <= 64 else 0  # bounded pair phase keeps planning cheap
        for _ in range(rounds):
            order = sorted(range(n), key=lambda k: (loads[k], k))
            hi = order[-1]
            gh, wa, ta, size_a = groups(hi)
            done = False
            for lo in order[: (min(n - 1, 32) if pairs else n - 1)]:
                if lo == hi or loads[hi] - loads[lo] <= 1e-9 * loads[hi]:
                    break
                if pairs:
                    pair_work -= 1
                    if pair_work < 0:
                        break
                gl, wb, tb, size_b = groups(lo)
                dw = wa[:, None] - wb[None, :]
                dt = ta[:, None] - tb[None, :]
                ok = (dw > 0) & (toks[lo] + dt <= budget) & (toks[hi] - dt <= budget)
                ok &= (size_a[:, None] < len(plans[hi])) | (size_b[None, :] > 0)  # hi never empty
                if not ok.any():
                    continue
                new = np.where(ok, np.maximum(loads[hi] - dw, loads[lo] + dw), np.inf)
                k = int(np.argmin(new))
                if not new.flat[k] < loads[hi] * (1 - 1e-9):
                    continue
                ia, ib = divmod(k, len(gl))
                give = [plans[hi][i] for i in gh[ia]]
                take = [plans[lo][i] for i in gl[ib]]
                plans[hi] = [r for i, r in enumerate(plans[hi]) if i not in gh[ia]] + take
                plans[lo] = [r for i, r in enumerate(plans[lo]) if i not in gl[ib]] + give
                for key in ((hi, False), (hi, True), (lo, False), (lo, True)):
                    cache.pop(key, None)
                d_w = sum(weight[r] for r in give) - sum(weight[r] for r in take)
                d_t = sum(tokens[r] for r in give) - sum(tokens[r] for r in take)
                loads[hi] -= d_w
                loads[lo] += d_w
                toks[hi] -= d_t
                toks[lo] += d_t
                done = True
                break
            if not done:
                if pairs or pair_work < 0:
                    break
                pairs = True
        by_load = sorted(range(n), key=lambda k: (-loads[k], k))
    else:
        by_load = list(range(n))
    half = n // 2
    folded = [None] * n
    for j in range(half):
        folded[j] = plans[by_load[j]]
        folded[j + half] = plans[by_load[n - 1 - j]]
    if n % 2:
        folded[n - 1] = plans[by_load[half]]
    return folded


@dataclass
class _Cursor:
    """Position of one source inside its current epoch's order."""

    epoch: int = 0
    shard_pos: int = 0  # index into the epoch's shard permutation
    sample_pos: int = 0  # index into that shard's sample permutation


class GlobalPlanner:
    """Infinite, deterministic sequence of packed micro-batch plans (lists of `Ref`)."""

    def __init__(self, cfg: DataConfig, indices: list[dict[str, Any]], flop_model: Optional[FlopModel] = None):
        """`flop_model`: FLOPs of one sample under the model being trained (`FlopModel`; training passes
        `qvl_train.monitor.flops.SampleFlops(cfg.model)`). Without one, `data.balance=compute` balances
        tokens (`self.weighting` says which weight is in use) and `flops()` is unavailable."""
        if len(indices) != len(cfg.sources):
            raise ValueError("one index per data source is required")
        self.cfg = cfg
        self.indices = indices
        self.weights = [float(s.weight) for s in cfg.sources]
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError("data source weights must be >= 0 with a positive sum")
        for i, idx in enumerate(indices):
            if self.weights[i] > 0 and not any(sh["samples"] for sh in idx["shards"]):
                raise ValueError(f"data source {cfg.sources[i].path} has no samples")
        self.source_cfgs = [cfg.for_source(s) for s in cfg.sources]
        self.max_pixels = [c.max_pixels for c in self.source_cfgs]
        self.limits = [min(s.max_tokens or cfg.max_tokens, cfg.max_tokens) for s in cfg.sources]
        """Token limit of one sample per source (see `capped_cost`)."""
        self.truncated = 0  # text-only samples planned at their source's limit (cut when read)
        self._epoch_events: list[tuple[int, int]] = []  # (source, epoch started) since last pop
        self._fingerprint = self._digest()
        self.lookahead = max(1, int(getattr(cfg, "pack_lookahead", 16)))
        self.cursors = [_Cursor() for _ in indices]
        self.draws = 0  # samples drawn from the mixture so far (incl. too_long ones)
        self.micro_batches = 0  # micro-batches planned so far
        self.buffer: list[Ref] = []
        self.skipped: dict[str, int] = {}
        self._perm_cache: dict[tuple, list[int]] = {}
        self._cost_cache: dict[Ref, int] = {}
        self._flops_cache: dict[Ref, float] = {}
        self.balance = str(getattr(cfg, "balance", "compute"))
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"data.balance={self.balance!r}; valid: {', '.join(BALANCE_MODES)}")
        self.flop_model = flop_model
        self.weighting = "tokens" if self.balance == "compute" and flop_model is None else self.balance
        """The weight balancing uses: `compute` (FLOPs from `flop_model`), `tokens` or `none`."""

    # ----------------------------------------------------------------------------- the order
    def _perm(self, n: int, *key: Any) -> list[int]:
        if not self.cfg.shuffle:
            return list(range(n))
        ck = (n,) + key
        perm = self._perm_cache.get(ck)
        if perm is None:
            if len(self._perm_cache) > 4096:  # bound memory over long runs
                self._perm_cache.clear()
            perm = list(range(n))
            _rng(self.cfg.seed, *key).shuffle(perm)
            self._perm_cache[ck] = perm
        return perm

    def _next_from_source(self, s: int) -> Ref:
        shards = self.indices[s]["shards"]
        cur = self.cursors[s]
        while True:
            shard_perm = self._perm(len(shards), "shards", s, cur.epoch)
            if cur.shard_pos >= len(shard_perm):
                cur.epoch, cur.shard_pos, cur.sample_pos = cur.epoch + 1, 0, 0
                self._epoch_events.append((s, cur.epoch))
                continue
            sh = shard_perm[cur.shard_pos]
            n = len(shards[sh]["samples"])
            if cur.sample_pos >= n:
                cur.shard_pos, cur.sample_pos = cur.shard_pos + 1, 0
                continue
            i = self._perm(n, "samples", s, cur.epoch, shards[sh]["name"])[cur.sample_pos]
            cur.sample_pos += 1
            return (s, sh, i)

    def _choose_source(self) -> int:
        if len(self.weights) == 1:
            return 0
        return _rng(self.cfg.seed, "mix", self.draws).choices(range(len(self.weights)), weights=self.weights)[0]

    def pop_epoch_events(self) -> list[tuple[int, int]]:
        """(source, epoch) for every source that started a new epoch since the last call."""
        events, self._epoch_events = self._epoch_events, []
        return events

    def uncapped_cost(self, ref: Ref) -> int:
        """LLM tokens of a sample (text + visual) under its source's pixel cap, before any token
        limit; -1 when an image size is unusable, -2 when a video cannot be sampled. From the index only."""
        s = ref[0]
        entry = self.entry(ref)
        c = text_tokens(entry, self.cfg.generation)
        for h, w in entry["images"]:
            try:
                c += planned_image_tokens(
                    self.cfg.generation, int(h), int(w), patch_size=self.cfg.patch_size, merge_size=self.cfg.merge_size,
                    min_pixels=self.cfg.min_pixels, max_pixels=self.max_pixels[s],
                )
            except (ValueError, ZeroDivisionError):  # absurd aspect ratio / zero side
                return -1
        if entry.get("videos"):
            try:
                c += sum(p.token_count(self.cfg.merge_size) + p.extra_text_tokens(self.cfg.generation)
                         for p in self.video_plans(ref))
            except BadVideo:  # e.g. frames under Qwen3-VL's 32-px minimum, too few frames
                return -2
        return c

    def cost(self, ref: Ref) -> int:
        """Planned LLM tokens of a sample (text + visual; see `capped_cost`), from the index only."""
        c = self._cost_cache.get(ref)
        if c is None:
            c = self.uncapped_cost(ref)
            if c > 0:
                c = capped_cost(c, not is_text_only(self.entry(ref)), self.token_budget(ref))
            if len(self._cost_cache) > 100_000:
                self._cost_cache.clear()
            self._cost_cache[ref] = c
        return c

    def token_budget(self, ref: Ref) -> int:
        """Most tokens sample `ref` may occupy (its source's `max_tokens`, else `data.max_tokens`): over
        it, a text-only sample is truncated to it and a sample with media is skipped (`too_long`)."""
        return self.limits[ref[0]]

    def flops(self, ref: Ref) -> float:
        """Forward FLOPs of a usable sample under `flop_model`, from the index only.

        The sample as the loader will build it: each image's grid from `smart_resize` under its source's
        pixel bounds (a fixed-size input, `DataSpec.fixed_image`: that square), each video's planned
        grid, its planned LLM tokens (`cost`, so a truncated text-only sample costs its limit) and as
        label tokens its text tokens (an upper bound: the index does not say how many belong to prompts;
        visual tokens and video timestamps never carry loss).
        """
        if self.flop_model is None:
            raise ValueError("GlobalPlanner has no flop_model: pass the model's FLOP model (training: "
                             "qvl_train.monitor.flops.SampleFlops(cfg.model)) to estimate FLOPs")
        f = self._flops_cache.get(ref)
        if f is None:
            f = self.flop_model(*self.flop_inputs(ref))
            if len(self._flops_cache) > 100_000:
                self._flops_cache.clear()
            self._flops_cache[ref] = f
        return f

    def flop_inputs(self, ref: Ref) -> tuple[list[tuple[int, int, int]], int, int]:
        """`(grid_thw, tokens, label_tokens)` of a usable sample, what `flop_model` receives (see `flops`)."""
        e, cfg = self.entry(ref), self.cfg
        grids = [tuple(p.grid_thw) for p in self.video_plans(ref)] if e.get("videos") else []
        spec = generations.get(cfg.generation)
        if spec.fixed_image is not None:  # every image resized to one square (Qwen-VL: 448², its pixel bound)
            side = math.isqrt(spec.image.max_pixels) // spec.image.patch_size
            grids += [(1, side, side)] * len(e["images"])
        else:
            grids += [image_grid(h, w, patch_size=cfg.patch_size, merge_size=cfg.merge_size, min_pixels=cfg.min_pixels,
                                 max_pixels=self.max_pixels[ref[0]]) for h, w in e["images"]]
        tokens = self.cost(ref)
        labels = min(text_tokens(e, cfg.generation), tokens)
        return grids, tokens, labels

    def weight(self, ref: Ref) -> float:
        """What balancing evens out for one sample (`self.weighting`): its FLOPs, else its tokens."""
        return self.flops(ref) if self.weighting == "compute" else float(self.cost(ref))

    def video_plans(self, ref: Ref) -> list[VideoPlan]:
        """Frames and grids of a sample's videos (`entry_video_plans`)."""
        return entry_video_plans(self.source_cfgs[ref[0]], self.entry(ref))

    def next_step(self, n: int) -> list[list[Ref]]:
        """Plan one optimizer step of `n` micro-batches: packed by tokens, then balanced per `data.balance`.

        The samples of the step (and the planner state after it) are those of `n` calls of
        `next_micro_batch`, whatever the balance mode; only their arrangement differs.
        """
        plans = [self.next_micro_batch() for _ in range(n)]
        self.truncated += sum(self.is_truncated(ref) for plan in plans for ref in plan)  # counted when placed
        if self.balance == "none":
            return plans
        refs = [r for p in plans for r in p]
        tokens = {r: self.cost(r) for r in refs}
        weight = tokens if self.weighting == "tokens" else {r: self.flops(r) for r in refs}
        return balance_step(plans, weight, tokens, self.cfg.max_tokens)

    def entry(self, ref: Ref) -> dict[str, Any]:
        s, sh, i = ref
        return self.indices[s]["shards"][sh]["samples"][i]

    def shard_name(self, ref: Ref) -> str:
        return self.indices[ref[0]]["shards"][ref[1]]["name"]

    def _draw_usable(self) -> Ref:
        """Next sample of the mixture that fits the budget; unusable ones are counted and skipped."""
        for _ in range(1_000_000):
            s = self._choose_source()
            self.draws += 1
            ref = self._next_from_source(s)
            c = self.cost(ref)
            if c < 0:
                self._count("bad_image_size" if c == -1 else "bad_video")
            elif c > self.limits[s]:
                self._count("too_long")
            elif c == 0:
                self._count("empty")
            else:
                return ref
        raise RuntimeError(f"no sample fits data.max_tokens={self.cfg.max_tokens} in 1e6 draws")

    def is_truncated(self, ref: Ref) -> bool:
        """True when a (text-only) sample is planned at its source's limit and is cut when read."""
        entry = self.entry(ref)
        return is_text_only(entry) and text_tokens(entry, self.cfg.generation) > self.token_budget(ref)

    def _count(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    # ----------------------------------------------------------------------------- packing
    def next_micro_batch(self) -> list[Ref]:
        """Plan the next micro-batch: refs whose costs sum to at most data.max_tokens."""
        self._fill()
        budget = self.cfg.max_tokens
        first = self.buffer.pop(0)
        plan = [first]
        remaining = budget - self.cost(first)
        self._fill()
        while True:
            best, best_cost = -1, -1
            for k, ref in enumerate(self.buffer):
                c = self.cost(ref)
                if best_cost < c <= remaining:
                    best, best_cost = k, c
            if best < 0:
                break
            plan.append(self.buffer.pop(best))
            remaining -= best_cost
            self._fill()
        self.micro_batches += 1
        return plan

    def _fill(self) -> None:
        while len(self.buffer) < self.lookahead:
            self.buffer.append(self._draw_usable())

    # ----------------------------------------------------------------------------- state
    def fingerprint(self) -> list[str]:
        """Short digest of each source's index, so a state is not applied to different data."""
        return list(self._fingerprint)

    def _digest(self) -> list[str]:
        out = []
        for idx in self.indices:
            h = hashlib.sha1()
            for sh in idx["shards"]:
                h.update(sh["name"].encode())
                h.update(str(len(sh["samples"])).encode())
            out.append(h.hexdigest()[:16])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "micro_batches": self.micro_batches,
            "draws": self.draws,
            "cursors": [[c.epoch, c.shard_pos, c.sample_pos] for c in self.cursors],
            "buffer": [list(r) for r in self.buffer],
            "skipped": dict(sorted(self.skipped.items())),
            "truncated": self.truncated,
            "fingerprint": self.fingerprint(),
            "max_tokens": self.cfg.max_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data state version {state.get('version')!r}")
        if state["fingerprint"] != self.fingerprint():
            raise ValueError("data state was taken on different data sources (index fingerprint differs)")
        if state.get("max_tokens") != self.cfg.max_tokens:
            raise ValueError(
                f"data state was taken with data.max_tokens={state.get('max_tokens')}, now {self.cfg.max_tokens}; "
                "the packing (and so the sample order) would differ"
            )
        self.micro_batches = int(state["micro_batches"])
        self.draws = int(state["draws"])
        self.cursors = [_Cursor(*map(int, c)) for c in state["cursors"]]
        self.buffer = [tuple(int(v) for v in r) for r in state["buffer"]]
        self.skipped = {k: int(v) for k, v in state["skipped"].items()}
        self.truncated = int(state.get("truncated", 0))  # absent in states of older versions
        self._epoch_events = []

    @property
    def epoch(self) -> int:
        """Epoch of the first source (the usual single-source case)."""
        return self.cursors[0].epoch
