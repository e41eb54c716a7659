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

Cost and packing
----------------
A sample's cost is `n_text_tokens + sum(image_token_count(h, w))` under the run's pixel bounds.
Samples costing more than `data.max_tokens` are dropped here and counted as `too_long`.
Micro-batches are packed greedily with a small lookahead buffer (`data.pack_lookahead` candidates):
a micro-batch starts with the oldest candidate (so no sample waits forever and the order stays
close to the shuffled stream), then repeatedly takes the candidate with the largest cost that still
fits (best fit; ties to the oldest), refilling the buffer after each take, until nothing fits.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from data_pipelines.schema import DataConfig
from data_pipelines.vision import image_token_count

STATE_VERSION = 1
Ref = tuple[int, int, int]
"""(source index, shard index in index.json, sample index in that shard)."""


def _rng(*parts: Any) -> random.Random:
    """A Random seeded by a stable string of `parts` (Python's str seeding hashes with SHA-512)."""
    return random.Random(":".join(str(p) for p in parts))


@dataclass
class _Cursor:
    """Position of one source inside its current epoch's order."""

    epoch: int = 0
    shard_pos: int = 0  # index into the epoch's shard permutation
    sample_pos: int = 0  # index into that shard's sample permutation


class GlobalPlanner:
    """Infinite, deterministic sequence of packed micro-batch plans (lists of `Ref`)."""

    def __init__(self, cfg: DataConfig, indices: list[dict[str, Any]]):
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
        self.lookahead = max(1, int(getattr(cfg, "pack_lookahead", 16)))
        self.cursors = [_Cursor() for _ in indices]
        self.draws = 0  # samples drawn from the mixture so far (incl. too_long ones)
        self.micro_batches = 0  # micro-batches planned so far
        self.buffer: list[Ref] = []
        self.skipped: dict[str, int] = {}
        self._perm_cache: dict[tuple, list[int]] = {}
        self._cost_cache: dict[Ref, int] = {}

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

    def cost(self, ref: Ref) -> int:
        """Planned LLM tokens of a sample (text + visual), from the index only."""
        c = self._cost_cache.get(ref)
        if c is None:
            s, sh, i = ref
            entry = self.indices[s]["shards"][sh]["samples"][i]
            c = int(entry["n_text_tokens"])
            for h, w in entry["images"]:
                try:
                    c += image_token_count(
                        int(h), int(w), patch_size=self.cfg.patch_size, merge_size=self.cfg.merge_size,
                        min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels,
                    )
                except (ValueError, ZeroDivisionError):  # absurd aspect ratio / zero side
                    c = -1
                    break
            if len(self._cost_cache) > 100_000:
                self._cost_cache.clear()
            self._cost_cache[ref] = c
        return c

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
                self._count("bad_image_size")
            elif c > self.cfg.max_tokens:
                self._count("too_long")
            elif c == 0:
                self._count("empty")
            else:
                return ref
        raise RuntimeError(f"no sample fits data.max_tokens={self.cfg.max_tokens} in 1e6 draws")

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

    @property
    def epoch(self) -> int:
        """Epoch of the first source (the usual single-source case)."""
        return self.cursors[0].epoch
