"""The loader the train loop calls: `StepLoader.next_step()` → this rank's packed micro-batches.

How a step is made
------------------
1. Every rank advances the same `GlobalPlanner` (packing.py) by one step of `micro_batches_per_step`
   micro-batch plans, from `index.json` only, balanced by estimated compute (`data.balance`) without
   looking at the dp size. Micro-batch j of the step belongs to dp rank `j % dp_size`, so the
   samples of step S (and of each micro-batch) are the same for any dp size (rank r just gets a
   different share). `last_step_stats()` reports packing efficiency and compute imbalance.
2. The rank groups the samples it was dealt by shard and reads their members (raw bytes, no
   auto-decoding, never pickle) with one `ranged.ShardReader`: exactly the members' bytes where the
   index records offsets and the source serves ranges (local files, http(s), s3; adjacent members
   coalesced), else by streaming each needed shard once (`data.cache_dir` keeps streamed shards on
   the node). `io_stats()` reports the step's bytes read and used.
3. Each sample: JSON → messages; images decoded and patchified (vision.py) and videos decoded,
   sampled and patchified (video.py, `data.video_*`) in the order they appear in the messages; the
   template rendered with the real per-image / per-video token counts (text.py; Qwen3-VL's video
   timestamps); M-RoPE positions (positions.py; Qwen2.5-VL's absolute-time video ids). A micro-batch
   with a video carries `media_kind` (0 image, 1 video per `grid_thw` row). Samples are
   concatenated into one `PackedBatch` of exactly `data.max_tokens` slots.

Bad data
--------
Broken JSON, missing members, undecodable images, a sample absent from its tar, or a sample whose
real token count exceeds the planned one (a lying index) are skipped and counted by reason; the
micro-batch is still produced (less full, possibly empty: `num_samples == 0`, `num_tokens == 0`).
Skips never change the number of micro-batches, so ranks stay in lock-step. A shard that cannot be
read (missing, refused, truncated or damaged mid-file) is logged once per shard with its error, and
each of its samples that could not be read is skipped as `shard_error` (a tar damaged mid-file keeps
the samples before the damage). The loader raises as soon as more than `data.max_bad_fraction` ×
`data.bad_window` of a rank's last `data.bad_window` read samples were bad: checked on every sample
from the first one (the window need not be full), so data broken from the start stops the run after
`floor(max_bad_fraction × bad_window) + 1` bad samples (11 with the defaults), and once the window is
full this is the plain fraction over it. That is a broken data set, not noise.
`last_step_skips()` names the step's skip counts and shards (the training run stops before an
optimizer step that got no sample on any rank); `log_skips(path)` lists every read-time skip,
one JSON line per sample, in a file capped at `SKIP_LOG_MAX_LINES` lines.

Sources, caps, epochs
---------------------
Each `data.sources` entry is resolved once (sources.py: local directory, brace pattern, URL,
`pipe:` template; the index fetched the same way); shards are opened by their URL. Per-source caps:
`max_pixels` is that source's pixel bound (planning and preprocessing), `max_tokens` its per-sample
token limit (text-only samples over it are truncated by `truncate_text_sample`, samples with media
are skipped at plan time), `max_frames` caps the frames sampled from its videos (`DataConfig.for_source`, planner and builder alike).
When a source starts a new epoch, dp rank 0 logs it once.

Planning ahead
--------------
With `data.plan_ahead` the plan of step S+1 is computed in one background thread while step S
trains. Planning is a pure function of the planner state, so the plan equals the inline one; the
loader's state is the planner state right after the step last returned (taken before the plan
ahead), so the prefetched plan is never part of a checkpoint and `load_state_dict` discards it.

Decode workers
--------------
With `data.num_workers` = N > 0, a background thread takes the plans of the next
`data.prefetch_steps` steps in order, reads this rank's members and sends each sample to one of N
worker processes (workers.py) that run the same `SampleBuilder.build`; the training thread then only
counts, truncates and packs the finished samples, in plan order, exactly as inline. Skips (and the
max_bad_fraction check) are counted when a step is consumed, not when it is built; the loader state
is still the planner state after the step last returned, and `load_state_dict` drops prefetched
steps like the plan made ahead. N = 0 builds inline when the step is asked for.

Truncation
----------
A text-only sample longer than its token budget (`GlobalPlanner.token_budget`: its source's
`max_tokens`, else `data.max_tokens`) keeps its first budget tokens (labels and positions cut alike;
the end-of-turn may be cut off) and is counted as `data_truncated` (by the planner, so the count is
global and survives a resume); the planner already planned it at exactly the budget from the index.
A sample with media over the budget never gets here: the planner skips it as `too_long`.

State
-----
`state_dict()` is the planner's state (global cursor per source, epochs, the packer's lookahead
buffer, plan-time skip counts): identical on all ranks and independent of dp size, so a resumed
loader with any dp size continues exactly where the old one stopped (at a step boundary).
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from data_pipelines import generations
from data_pipelines.packing import FlopModel, GlobalPlanner, Ref
from data_pipelines.positions import position_ids_for
from data_pipelines.ranged import IOStats, ShardCache, ShardReader, ShardRequest, stream_shard
from data_pipelines.schema import IGNORE_INDEX, DataConfig, DataSource, PackedBatch
from data_pipelines.sources import resolve_source
from data_pipelines.text import PAD_ID, QwenTokenizer, get_tokenizer, message_parts
from data_pipelines.video import BadVideo, VideoSettings, preprocess_video_with, video_norm_lut
from data_pipelines.vision import BadImage, decode_image, image_codes, norm_lut, source_hw
from data_pipelines.workers import DecodePool

log = logging.getLogger(__name__)

SKIP_LOG_MAX_LINES = 100_000
"""Lines `StepLoader.log_skips` writes at most; the last line then says the list was cut."""


class SkipSample(Exception):
    """A sample that cannot be used; `reason` names the skip counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def read_shard_members(path: str, keys: set[str], stats: Optional[IOStats] = None) -> tuple[dict[str, dict[str, bytes]], Optional[str]]:
    """Stream one tar shard (any source) from its start; return {key: {ext: bytes}} for `keys` only,
    grouped as WebDataset groups members. `stats` (optional) counts the bytes read.

    A truncated/corrupt tar yields what could be read before the damage plus an error string.
    """
    found: dict[str, dict[str, bytes]] = {}
    err = None
    try:
        stream_shard(path, set(keys), stats if stats is not None else IOStats(), found)
    except Exception as e:  # tarfile.ReadError, OSError, ... — keep what we have
        err = f"{type(e).__name__}: {e}"
    return found, err


def shard_request(url: str, shard: dict[str, Any], entries: list[dict[str, Any]]) -> ShardRequest:
    """What one rank needs from one shard: the samples' keys and, where the index has them, their
    members' byte spans (`members: {ext: [data_offset, size]}`)."""
    return ShardRequest(
        url=url, keys=[e["key"] for e in entries], shard_size=shard.get("size"), name=shard["name"],
        members={e["key"]: ({ext: (int(o), int(n)) for ext, (o, n) in e["members"].items()} if e.get("members") else None)
                 for e in entries},
    )


class SampleBuilder:
    """Raw members of one sample → (input_ids, labels, positions, pixel codes, grids).

    With a `source`, its caps apply (`DataConfig.for_source`): its `max_pixels` for images, its
    `max_frames` for videos.
    """

    def __init__(self, cfg: DataConfig, tokenizer: QwenTokenizer, source: Optional[DataSource] = None):
        self.cfg = cfg.for_source(source) if source is not None else cfg
        self.tok = tokenizer

    def build(self, members: dict[str, bytes]) -> dict[str, Any]:
        cfg = self.cfg
        raw = members.get("json")
        if raw is None:
            raise SkipSample("missing_member", "no .json member")
        try:
            doc = json.loads(raw.decode("utf-8"))
            messages = doc["messages"]
            sample_id = str(doc["id"])
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
        except Exception as e:
            raise SkipSample("bad_json", f"{type(e).__name__}: {e}") from e

        codes, grids, counts, sizes, kinds = [], [], [], {}, []
        videos: list[tuple] = []  # (grid, timestamps, second_per_grid) per video part, in order
        try:
            media_parts = [p for m in messages for p in message_parts(m) if p.get("type") in ("image", "video")]
        except Exception as e:
            raise SkipSample("bad_json", str(e)) from e
        merge2 = cfg.merge_size * cfg.merge_size
        spec = generations.get(cfg.generation)
        for part in media_parts:
            name = str(part.get("name", "")).lower()
            blob = members.get(name)
            if blob is None:
                raise SkipSample("missing_member", f"{part['type']} member {name!r} absent")
            if part["type"] == "video":
                if spec.video is None:
                    raise SkipSample("bad_video", f"{spec.name} takes no video")
                feats = self._video(blob)
                codes.append(feats.pixel_values.numpy())
                grids.append(feats.grid_thw)
                kinds.append(1)
                videos.append((feats.grid_thw, feats.frame_timestamps, feats.second_per_grid))
                continue
            try:
                img = decode_image(
                    blob, fast_decode=cfg.fast_decode, factor=cfg.patch_size * cfg.merge_size,
                    min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                )
                pv, grid = spec.fixed_image(img, as_codes=True) if spec.fixed_image else image_codes(
                    img, patch_size=cfg.patch_size, merge_size=cfg.merge_size, min_pixels=cfg.min_pixels,
                    max_pixels=cfg.max_pixels,
                )  # uint8 codes, one frame: normalised on the training device (`pixel_lut`)
            except (BadImage, ValueError) as e:
                raise SkipSample("bad_image", str(e)) from e
            codes.append(pv)
            grids.append(grid)
            kinds.append(0)
            sizes[name] = (source_hw(img), (grid[1] * cfg.patch_size, grid[2] * cfg.patch_size))
            counts.append(spec.fixed_image_tokens or grid[0] * grid[1] * grid[2] // merge2)
        try:
            ids, labels = self.tok.encode_conversation(
                messages, counts, generation=cfg.generation, image_sizes=sizes,
                videos=[(g, ts) for g, ts, _ in videos], merge_size=cfg.merge_size,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SkipSample("bad_json", f"template: {e}") from e
        positions = position_ids_for(
            cfg.generation, self.tok.position_view(ids, cfg.generation), [g for g, k in zip(grids, kinds) if k == 0],
            [v[0] for v in videos],
            cfg.merge_size, video_second_per_grid=[v[2] for v in videos],
        )
        return {
            "id": sample_id, "input_ids": ids, "labels": labels, "positions": positions,
            "pixel_codes": codes, "grids": grids, "kinds": kinds,
            "visual_tokens": sum(counts) + sum(t * h * w for t, h, w in (v[0] for v in videos)) // merge2,
        }

    def _video(self, blob: bytes):
        """One stored video → VideoFeatures under the run's `data.video_*` settings (SkipSample if bad)."""
        cfg = self.cfg
        try:
            return preprocess_video_with(
                blob, cfg.generation, VideoSettings.from_config(cfg), patch_size=cfg.patch_size,
                merge_size=cfg.merge_size, temporal_patch_size=cfg.temporal_patch_size, as_codes=True,
            )
        except (BadVideo, ValueError) as e:
            raise SkipSample("bad_video", str(e)) from e


def make_builders(cfg: DataConfig) -> list[SampleBuilder]:
    """One SampleBuilder per `cfg.sources` entry (its caps applied), sharing one tokenizer; the
    loader and every decode worker build samples with these."""
    tok = get_tokenizer(cfg.tokenizer, cfg.generation)
    return [SampleBuilder(cfg, tok, source) for source in cfg.sources]


def truncate_text_sample(sample: dict[str, Any], limit: int) -> dict[str, Any]:
    """Cut a text-only built sample to its first `limit` tokens (ids, labels, positions).

    The planner costs such a sample at `limit` (packing.capped_cost); samples with media are never
    cut (they are rejected at plan time instead), so this is only called for text-only ones.
    """
    if len(sample["input_ids"]) <= limit or sample["grids"] or sample["visual_tokens"]:
        return sample
    return {
        **sample, "input_ids": sample["input_ids"][:limit], "labels": sample["labels"][:limit],
        "positions": sample["positions"][:, :limit],
    }


def pack(cfg: DataConfig, samples: list[dict[str, Any]]) -> PackedBatch:
    """Concatenate built samples into one PackedBatch of exactly cfg.max_tokens slots.

    `labels[i]` is the target of the prediction made at position i (the next token, already shifted),
    so the model's loss is plainly `CE(logits[i], labels[i])` and `num_label_tokens` counts targets.
    """
    L = cfg.max_tokens
    input_ids = torch.full((L,), PAD_ID, dtype=torch.int64)
    labels = torch.full((L,), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros((3, L), dtype=torch.int64)
    cu = [0]
    pvs, grids, ids_out, kinds = [], [], [], []
    n_vis = 0
    for s in samples:
        a, n = cu[-1], len(s["input_ids"])
        input_ids[a : a + n] = torch.tensor(s["input_ids"], dtype=torch.int64)
        # Next-token targets: position i is trained to predict token i+1 of the same sample, so the
        # labels are shifted left inside each sample and the last token of a sample predicts nothing.
        if n > 1:
            labels[a : a + n - 1] = torch.tensor(s["labels"][1:], dtype=torch.int64)
        position_ids[:, a : a + n] = s["positions"]
        cu.append(a + n)
        pvs.extend(s["pixel_codes"])
        grids.extend(s["grids"])
        kinds.extend(s.get("kinds", [0] * len(s["grids"])))
        ids_out.append(s["id"])
        n_vis += s["visual_tokens"]
    pixel_values = pack_codes(cfg, pvs)
    grid_thw = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        pixel_values=pixel_values,
        grid_thw=grid_thw,
        sample_ids=ids_out,
        num_tokens=cu[-1],
        num_label_tokens=int((labels != IGNORE_INDEX).sum()),
        num_visual_tokens=n_vis,
        media_kind=torch.tensor(kinds, dtype=torch.int64) if any(kinds) else None,
        pixel_lut=pixel_lut(cfg.generation),
    )


def pack_codes(cfg: DataConfig, codes: list[np.ndarray]) -> torch.Tensor:
    """Per-medium uint8 codes [N, C, T', p*p] → the batch's uint8 pixel_values [P, C*T*p*p], T = the
    temporal patch size (1 for Qwen-VL): an image's single frame is written T times here, in the one
    copy that joins the media (the workers ship it once)."""
    t = 1 if generations.get(cfg.generation).fixed_image else cfg.temporal_patch_size  # a fixed input has no time axis
    k = cfg.patch_size * cfg.patch_size
    out = np.empty((sum(c.shape[0] for c in codes), 3, t, k), dtype=np.uint8)
    row = 0
    for c in codes:
        out[row : row + c.shape[0]] = c  # broadcasts T' = 1 over the T frames
        row += c.shape[0]
    return torch.from_numpy(out.reshape(out.shape[0], 3 * t * k))


def pixel_lut(generation: str) -> torch.Tensor:
    """[2, 3, 256] float32 tables of `PackedBatch.pixel_lut` for `generation`: row 0 images (HF's image
    processor arithmetic, `norm_lut`; Qwen-VL's torchvision transform, `qwen_vl_lut`), row 1 videos (the
    fast video processors' fused arithmetic, `video_norm_lut`)."""
    gen = generations.get(generation)
    if gen.fixed_image_lut is not None:
        image = video = gen.fixed_image_lut()
    else:
        spec = gen.image
        image, video = norm_lut(tuple(spec.mean), tuple(spec.std)), video_norm_lut(tuple(spec.mean), tuple(spec.std))
    return torch.from_numpy(np.stack([image, video]))


@dataclass
class StepPlan:
    """One planned step: its micro-batch plans, their stats, epoch starts, the planner state after it."""

    plans: list[list[Ref]]
    stats: dict[str, float]
    epochs: list[tuple[int, int]]
    state: dict[str, Any]


Outcome = Any
"""A built sample (dict) or the SkipSample that says why there is none."""


@dataclass
class PrefetchedStep:
    """A step whose samples are being built by the decode workers: its plan and, per sample, a
    Future of `DecodePool.build` (or the SkipSample when the sample was not found in its shard)."""

    step: StepPlan
    pending: dict[Ref, Any]
    io: Optional[IOStats] = None

    def outcome(self, ref: Ref) -> Outcome:
        todo = self.pending[ref]
        if isinstance(todo, SkipSample):
            return todo
        kind, payload = todo.result()
        return SkipSample(*payload) if kind == "skip" else payload


class StepLoader:
    """One dp rank's view of the global packed stream; see the module docstring."""

    def __init__(self, cfg: DataConfig, *, micro_batches_per_step: int, dp_rank: int, dp_size: int, root: str = ".",
                 flop_model: Optional[FlopModel] = None):
        """`flop_model`: FLOPs of one sample under the model being trained, for `data.balance=compute` and
        the imbalance stats (`packing.FlopModel`; training passes `qvl_train.monitor.flops.SampleFlops`).
        Without one the planner balances and measures tokens."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batches_per_step < 1 or micro_batches_per_step % dp_size:
            raise ValueError(
                f"micro_batches_per_step={micro_batches_per_step} must be a positive multiple of dp_size={dp_size}"
            )
        generations.check(cfg.generation)
        self.cfg = cfg
        self.micro_batches_per_step = micro_batches_per_step
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sources = [resolve_source(s.path, s.index, root) for s in cfg.sources]
        self.planner = GlobalPlanner(cfg, [src.index for src in self.sources], flop_model)
        self.builders = make_builders(cfg)
        self.builder = self.builders[0]
        self.read_skipped: dict[str, int] = {}
        self._step_skips: list[tuple[Ref, str, str]] = []  # (ref, reason, detail) of the step last assembled
        self._read_errors: dict[Ref, tuple[str, str, str]] = {}  # ref not read → (reason, shard name, error)
        self._errored_shards: set[str] = set()  # shards whose read error was logged
        self._skip_log = None  # open file of log_skips(), with its line count
        self._skip_lines = 0
        self._recent: deque[bool] = deque(maxlen=cfg.bad_window)  # True = bad, over read samples
        self._last_stats: dict[str, float] = {}
        self._state: Optional[dict[str, Any]] = None  # planner state after the last step returned
        self._ahead: Optional[Future] = None  # the plan of the next step, being made
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="plan-ahead") if cfg.plan_ahead else None
        self._decode: Optional[DecodePool] = None
        self._jobs: deque[Future] = deque()  # PrefetchedStep futures, oldest first
        cache = ShardCache(cfg.cache_dir, int(cfg.cache_max_gb * (1 << 30))) if cfg.cache_dir else None
        self._reader = ShardReader(cache)
        self._last_io = IOStats()
        if cfg.num_workers != "auto" and cfg.num_workers:  # auto: resolved by the training run (train.run)
            self._decode = DecodePool(cfg.num_workers, cfg)
            self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="data-prefetch")

    # ---------------------------------------------------------------------------------- API
    def next_step(self) -> list[PackedBatch]:
        """This rank's micro-batches of the next optimizer step (micro_batches_per_step // dp_size)."""
        if self._decode is not None:
            job = self._next_prefetched()
            self._use_plan(job.step)
            self._last_io = job.io or IOStats()
            return self._assemble(self._mine(job.step.plans), job.outcome)
        mine = self._mine(self._take_plan())
        self._last_io = IOStats()
        raw = self._read([ref for plan in mine for ref in plan], self._last_io)
        return self._assemble(mine, lambda ref: self._build_inline(ref, raw))

    def _mine(self, plans: list[list[Ref]]) -> list[list[Ref]]:
        return plans[self.dp_rank :: self.dp_size]

    def _assemble(self, mine: list[list[Ref]], outcome) -> list[PackedBatch]:
        """Count, truncate and pack the samples of this rank's micro-batches, in plan order;
        `outcome(ref)` is the built sample or its SkipSample (built inline or by a worker)."""
        batches = []
        self._step_skips = []
        for plan in mine:
            built, used = [], 0
            for ref in plan:
                sample = self._count(outcome(ref), ref)
                if sample is None:
                    continue
                sample = truncate_text_sample(sample, self.planner.token_budget(ref))
                n = len(sample["input_ids"])
                if used + n > self.cfg.max_tokens:  # index promised fewer tokens than the data has
                    self._recent.pop()  # recounted as bad below
                    self._bad(ref, "cost_mismatch", f"{n} tokens, more than the index promised")
                    continue
                used += n
                built.append(sample)
            batches.append(pack(self.cfg, built))
        return batches

    def last_step_stats(self) -> dict[str, float]:
        """Planning stats of the step last returned by `next_step()` (identical on every rank).

        `packing_efficiency`: planned real tokens / slots of the step; `dp_imbalance`: max / mean of
        the estimated compute (the `flop_model`'s FLOPs; tokens without one) over dp ranks;
        `mb_imbalance`: the same over the step's micro-batches; `est_flops` (with a `flop_model` only):
        estimated forward FLOPs of the whole step. Empty before the first step. Estimates from the
        index: read-time skips are not reflected.
        """
        return dict(self._last_stats)

    def io_stats(self) -> dict[str, int]:
        """This rank's shard I/O for the step last returned by `next_step()`: `data/bytes_read` (pulled
        from the shard sources, whole shards downloaded into `data.cache_dir` included),
        `data/bytes_used` (the member bytes of the samples read) and `data/bytes_cached` (read out of the
        node-local cache). The training run sums them over dp ranks into metrics.jsonl; read / used is
        the I/O amplification (1.0 for ranged reads, more when shards are streamed)."""
        io = self._last_io
        return {"data/bytes_read": io.bytes_read, "data/bytes_used": io.bytes_used, "data/bytes_cached": io.bytes_cached}

    def _plan_stats(self, plans: list[list[Ref]]) -> dict[str, float]:
        p = self.planner
        weigh = p.flops if p.flop_model is not None else p.cost
        mb = np.array([sum(weigh(r) for r in plan) for plan in plans], dtype=np.float64)
        toks = sum(p.cost(r) for plan in plans for r in plan)
        ranks = np.array([mb[r :: self.dp_size].sum() for r in range(self.dp_size)])
        stats = {
            "packing_efficiency": toks / (len(plans) * self.cfg.max_tokens),
            "dp_imbalance": float(ranks.max() / ranks.mean()) if ranks.sum() > 0 else 1.0,
            "mb_imbalance": float(mb.max() / mb.mean()) if mb.sum() > 0 else 1.0,
        }
        if p.flop_model is not None:
            stats["est_flops"] = float(mb.sum())
        return stats

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable, identical on all ranks, dp-size independent (taken between steps)."""
        return json.loads(json.dumps(self._planner_state()))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict()` was taken (any dp_size); a plan made ahead and steps
        prefetched by decode workers are dropped."""
        self._drop_ahead()
        self.planner.load_state_dict(state)
        self._state = None

    def close(self) -> None:
        """Stop the planning thread (waits for a plan in progress) and the decode workers (their
        processes are ended and reaped); the loader cannot plan ahead or prefetch after."""
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._decode is not None:
            self._prefetch.shutdown(wait=True)
            self._decode.close()
            self._decode = None
        self._reader.close()
        if self._skip_log is not None:
            self._skip_log.close()
            self._skip_log = None

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of this rank's decode workers (empty with data.num_workers=0 or once closed)."""
        return self._decode.pids if self._decode is not None else []

    def stats(self) -> dict[str, int]:
        """Cumulative skip counts of this rank: `data_skipped` and `data_skipped/<reason>`, plus
        `data_truncated` (text-only samples cut to their token budget; global, from dp rank 0; not a skip).

        `shard_error` counts samples lost to a shard that could not be read (logged once per shard).
        Plan-time skips (too_long, ...) are global and restored by load_state_dict; they are reported
        by dp rank 0 only, so summing `stats()` over dp ranks gives global totals. Read-time skips
        (bad_json, bad_image, bad_video, missing_member, missing_sample, shard_error, cost_mismatch) are this rank's own
        since this loader was created.
        """
        counts: dict[str, int] = {}
        planned = self._planner_state()
        if self.dp_rank == 0:
            counts.update(planned["skipped"])
        for k, v in self.read_skipped.items():
            counts[k] = counts.get(k, 0) + v
        out = {"data_skipped": sum(counts.values())}
        out.update({f"data_skipped/{k}": v for k, v in sorted(counts.items())})
        if self.dp_rank == 0 and planned.get("truncated"):
            out["data_truncated"] = int(planned["truncated"])
        return out

    def last_step_skips(self) -> dict[str, Any]:
        """This rank's read-time skips in the step last returned: `count`, `reasons` ({reason: n}) and
        `shards` (the sorted names of the shards those samples are in)."""
        reasons: dict[str, int] = {}
        for _, reason, _ in self._step_skips:
            reasons[reason] = reasons.get(reason, 0) + 1
        shards = sorted({self.planner.shard_name(ref) for ref, _, _ in self._step_skips})
        return {"count": len(self._step_skips), "reasons": reasons, "shards": shards}

    def log_skips(self, path: str) -> None:
        """From now on append every read-time skip of this rank to `path` as one JSON line
        (`id`, `source`, `shard`, `key`, `reason`, `detail`), at most `SKIP_LOG_MAX_LINES` lines in all
        (lines already in the file, from an earlier run of a resumed job, count); the last line then
        says that the list was cut and that `stats()` keeps counting."""
        if self._skip_log is not None:
            self._skip_log.close()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            with open(path, "rb") as f:
                self._skip_lines = sum(1 for _ in f)
        except FileNotFoundError:
            self._skip_lines = 0
        self._skip_log = open(path, "a", encoding="utf-8", buffering=1)

    def _log_skip(self, ref: Ref, reason: str, detail: str) -> None:
        f = self._skip_log
        if f is None or self._skip_lines > SKIP_LOG_MAX_LINES:
            return
        if self._skip_lines == SKIP_LOG_MAX_LINES:
            line = {"truncated": True, "message": f"cut at {SKIP_LOG_MAX_LINES} lines: later skips are only counted "
                    "(data_skipped/<reason> in metrics.jsonl)"}
        else:
            entry = self.planner.entry(ref)
            line = {"id": str(entry.get("id")), "source": self.sources[ref[0]].path, "shard": self.planner.shard_name(ref),
                    "key": entry["key"], "reason": reason, "detail": detail[:500]}
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._skip_lines += 1

    @property
    def epoch(self) -> int:
        """Epoch of the first source at the step last returned."""
        return int(self._planner_state()["cursors"][0][0])

    # ------------------------------------------------------------------------- planning
    def _plan_step(self) -> StepPlan:
        """Plan the next step on the planner (inline or on the planning thread, never both at once)."""
        plans = self.planner.next_step(self.micro_batches_per_step)
        return StepPlan(plans, self._plan_stats(plans), self.planner.pop_epoch_events(), self.planner.state_dict())

    def _take_plan(self) -> list[list[Ref]]:
        """The next step's plans (made ahead if possible), now the current step."""
        step = self._next_plan()
        self._use_plan(step)
        return step.plans

    def _next_plan(self) -> StepPlan:
        """The next step's plan (made ahead if possible); starts planning the step after."""
        step = self._ahead.result() if self._ahead is not None else self._plan_step()
        self._ahead = None
        if self._pool is not None:
            self._ahead = self._pool.submit(self._plan_step)
        return step

    def _use_plan(self, step: StepPlan) -> None:
        """Make `step` the step last returned: its planner state, its stats, its epoch log lines."""
        self._state, self._last_stats = step.state, step.stats
        if self.dp_rank == 0:
            self._log_epochs(step.epochs)

    # --------------------------------------------------------------------- decode workers
    def _next_prefetched(self) -> PrefetchedStep:
        """The next step, built by the workers; keeps `prefetch_steps` more steps in the making."""
        while len(self._jobs) < 1 + self.cfg.prefetch_steps:
            self._jobs.append(self._prefetch.submit(self._prefetch_step))
        return self._jobs.popleft().result()

    def _prefetch_step(self) -> PrefetchedStep:
        """(prefetch thread) Plan the next step, read this rank's members, queue every build."""
        step = self._next_plan()
        refs = [ref for plan in self._mine(step.plans) for ref in plan]
        io = IOStats()
        raw = self._read(refs, io)
        pending: dict[Ref, Any] = {}
        for ref in refs:
            if ref not in pending:
                members = raw.get(ref)
                pending[ref] = (
                    self._missing(ref) if members is None else self._decode.submit(ref[0], members)
                )
        return PrefetchedStep(step, pending, io)

    def _drop_prefetched(self) -> None:
        """Forget the steps built ahead (queued builds are cancelled; running ones just finish)."""
        jobs, self._jobs = list(self._jobs), deque()
        for job in jobs:
            job.cancel()
        for job in jobs:
            try:
                pending = job.result().pending.values() if not job.cancelled() else ()
            except Exception:  # a step that is thrown away may fail; consuming it would say why
                continue
            for todo in pending:
                if isinstance(todo, Future):
                    todo.cancel()

    def _log_epochs(self, events: list[tuple[int, int]]) -> None:
        for s, epoch in events:
            n = sum(len(sh["samples"]) for sh in self.planner.indices[s]["shards"])
            log.info(
                "data: source %d (%s) ran through its %d samples; epoch %d starts with a new shuffle",
                s, self.sources[s].path, n, epoch,
            )

    def _drop_ahead(self) -> None:
        self._drop_prefetched()  # its thread plans on the planner: stop it first
        if self._ahead is not None:
            self._ahead.cancel()
            try:
                self._ahead.result()
            except Exception:  # a plan that is thrown away may fail; the inline plan would say why
                pass
            self._ahead = None

    def _planner_state(self) -> dict[str, Any]:
        """The planner state after the step last returned (not the plan made ahead)."""
        if self._state is None:
            self._drop_ahead()
            self._state = self.planner.state_dict()
        return self._state

    # ----------------------------------------------------------------------------- internals
    def _read(self, refs: list[Ref], io: Optional[IOStats] = None) -> dict[Ref, dict[str, bytes]]:
        """Read the members of `refs`: one request list per shard (by range where the index has
        offsets, else one streaming pass), shards in plan order; bytes counted into `io`."""
        by_shard: dict[tuple[int, int], dict[str, Ref]] = {}
        for ref in refs:
            by_shard.setdefault((ref[0], ref[1]), {})[self.planner.entry(ref)["key"]] = ref
        requests = [
            shard_request(self.sources[s].shard_urls[sh], self.planner.indices[s]["shards"][sh],
                          [self.planner.entry(ref) for ref in key_to_ref.values()])
            for (s, sh), key_to_ref in by_shard.items()
        ]
        out: dict[Ref, dict[str, bytes]] = {}
        self._read_errors = {}  # the errors of this read only: its refs are built (or found missing) before the next read
        for req, key_to_ref, (found, err, stats) in zip(requests, by_shard.values(), self._reader.read_many(requests)):
            if io is not None:
                io.add(stats)
            for key, members in found.items():
                out[key_to_ref[key]] = members
            lost = [ref for key, ref in key_to_ref.items() if key not in found]
            if err is not None:
                self._shard_error(req.name, "shard_error", err, lost)
            elif lost:  # tarfile ends a stream quietly at a truncation or a damaged header
                self._shard_error(req.name, "shard_error", "the shard ends before samples its index lists (truncated "
                                  "or damaged mid-file, or the index does not match the shard)", lost)
        return out

    def _shard_error(self, name: str, reason: str, err: str, lost: list[Ref]) -> None:
        """A shard read failed with `err` or came back without samples: those samples (`lost`) become
        `reason` skips; the shard and its error are logged once."""
        for ref in lost:
            self._read_errors[ref] = (reason, name, err)
        if name not in self._errored_shards:
            self._errored_shards.add(name)
            log.warning("data: dp rank %d could not read shard %s: %s (%d of its samples needed by this step lost; "
                        "counted as data_skipped/%s, listed in data_skipped.jsonl)", self.dp_rank, name, err, len(lost), reason)

    def _missing(self, ref: Ref) -> SkipSample:
        failed = self._read_errors.get(ref)  # a sample twice in one step (an epoch boundary) fails alike
        if failed is not None:
            return SkipSample(failed[0], f"{failed[1]}: {failed[2]}")
        return SkipSample("missing_sample", f"{self.planner.shard_name(ref)}:{self.planner.entry(ref)['key']} is not in the shard")

    def _build_inline(self, ref: Ref, raw: dict[Ref, dict[str, bytes]]) -> Outcome:
        members = raw.get(ref)
        if members is None:
            return self._missing(ref)
        try:
            return self.builders[ref[0]].build(members)
        except SkipSample as e:
            return e

    def _count(self, outcome: Outcome, ref: Ref) -> Optional[dict[str, Any]]:
        """Count a sample as good or bad (the bad-fraction window); the sample, or None if skipped."""
        if isinstance(outcome, SkipSample):
            self._bad(ref, outcome.reason, str(outcome))
            return None
        self._recent.append(False)
        return outcome

    def _bad(self, ref: Ref, reason: str, detail: str) -> None:
        """Count one skipped sample, list it, and stop once the bad samples among the last
        `bad_window` read exceed `max_bad_fraction × bad_window` (from the first sample on)."""
        self.read_skipped[reason] = self.read_skipped.get(reason, 0) + 1
        self._step_skips.append((ref, reason, detail))
        self._log_skip(ref, reason, detail)
        self._recent.append(True)
        bad, window = sum(self._recent), self._recent.maxlen
        if bad > self.cfg.max_bad_fraction * window:
            shards = sorted({self.planner.shard_name(r) for r, _, _ in self._step_skips})
            raise RuntimeError(
                f"{bad} of the last {len(self._recent)} samples read on dp rank {self.dp_rank} were unusable, more "
                f"than data.max_bad_fraction={self.cfg.max_bad_fraction} of data.bad_window={window} allows; "
                f"skip counts: {self.read_skipped}; shards of this step's skips: {shards[:10]}. Check the shards "
                "(python -m data_pipelines.inspect DIR; data_skipped.jsonl in the output dir lists each sample and why)."
            )
