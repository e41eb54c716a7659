"""The two contracts of the data side: its typed config and the `PackedBatch` it hands to the model.

The data side never imports `qvl_train`; the model side consumes `PackedBatch` and nothing else.

PackedBatch is the packed "THD" layout: every sample of one micro-batch concatenated into one row of
`L = data.max_tokens` slots. Real tokens come first (samples back to back, boundaries in `cu_seqlens`),
padding fills the tail (`input_ids = pad`, `labels = -100`, positions 0). No attention crosses a sample
boundary; the padding tail is its own segment and never influences a real token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional
from urllib.parse import urlparse

import torch

IGNORE_INDEX = -100


SHARD_FIELD = "{shard}"
"""Placeholder for the shard file name in a source template (`pipe:... s3://bucket/dir/{shard} -`)."""
SHARD_NAME = re.compile(r"[^/\s'\"{}]+\.tar\b")
_BRACES = re.compile(r"\{[^{}]*(,|\.\.)[^{}]*\}")


def is_url(path: str) -> bool:
    """True for `pipe:` commands and `scheme://` URLs (a Windows drive letter is not a scheme)."""
    return path.startswith("pipe:") or len(urlparse(path).scheme) > 1


def check_source_path(path: str) -> None:
    """Config-time check of a source path (docs/data.md "Sources"); raises ValueError saying how to fix it.

    Imports webdataset only for URLs, so configs without remote sources build without it."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError("data.sources[].path is empty; give a shard directory, brace pattern or URL")
    if path.startswith("pipe:"):
        if SHARD_FIELD not in path and not _BRACES.search(path) and not SHARD_NAME.search(path):
            raise ValueError(
                f"data source {path!r}: a pipe: source needs {SHARD_FIELD} where the shard file name goes "
                "(e.g. 'pipe:aws s3 cp s3://bucket/data/{shard} -') or a brace pattern of shard names"
            )
        return
    scheme = urlparse(path).scheme
    if len(scheme) > 1 and scheme != "file":
        from webdataset.gopen import gopen_schemes

        if scheme not in gopen_schemes and scheme != "s3":  # s3: ranged GETs through boto3 (data_pipelines/ranged.py)
            known = ", ".join(sorted(k for k in gopen_schemes if k not in ("__default__", "pipe")))
            raise ValueError(
                f"data source {path!r}: webdataset cannot open {scheme}:// URLs itself; read them through a "
                f"command, e.g. 'pipe:aws s3 cp {scheme}://bucket/data/{SHARD_FIELD} -' (it opens: pipe, file, {known})"
            )


@dataclass
class DataSource:
    """One weighted stream of WebDataset shards."""

    path: str = "data/synth"
    """Where the shards are: a directory holding `index.json` (written by the synth factory /
    make_shards), a brace pattern of shards (`dir/shard-{000000..000009}.tar`), a URL webdataset opens
    (`http(s)://host/dir`), or a template with `{shard}` where the shard file name goes
    (`pipe:aws s3 cp s3://bucket/dir/{shard} -`); see docs/data.md "Sources"."""
    weight: float = 1.0
    """Relative sampling weight when several sources are blended."""
    index: Optional[str] = None
    """Where this source's `index.json` is (local path or URL, `pipe:` included); default: next to
    the shards, fetched the same way."""
    max_pixels: Optional[int] = None
    """Pixel cap of this source's images (overrides `data.max_pixels` for them; planning uses it too)."""
    max_frames: Optional[int] = None
    """Frame cap of this source's videos (passed to video decoding; default: the generation's)."""
    max_tokens: Optional[int] = None
    """Token cap of one sample of this source (<= data.max_tokens): a text-only sample over it is
    truncated, a sample with media over it is skipped and counted (`too_long`)."""

    def __post_init__(self) -> None:
        check_source_path(self.path)
        if not math.isfinite(float(self.weight)) or self.weight < 0:
            raise ValueError(f"data source {self.path!r}: weight={self.weight} must be a finite number >= 0")
        for key in ("max_pixels", "max_frames", "max_tokens"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"data source {self.path!r}: {key}={value!r} must be a positive integer (or omitted)"
                )


@dataclass
class DataConfig:
    """Streaming, preprocessing and packing of the training data (config group `data/`)."""

    sources: list[DataSource] = field(default_factory=lambda: [DataSource()])
    """Shard sources; each a directory with an `index.json` (see README: shard format)."""
    valid: list[DataSource] = field(default_factory=list)
    """Held-out shard sources (same format as `sources`), each evaluated separately every `eval.every`
    steps; never part of the training stream. Make one with the synth factory and another `--seed`."""
    max_tokens: int = 2048
    """Token budget of one packed micro-batch sequence (text + visual tokens, padding fills the rest)."""
    seed: int = 1234
    """Seed of the global stream's shuffle (independent of the model seed)."""
    shuffle: bool = True
    """Shuffle shard order and samples within each shard, anew every epoch."""
    generation: str = "qwen2_vl"
    """Model generation whose chat template, special tokens and positions are produced."""
    tokenizer: Optional[str] = None
    """Directory with a `tokenizer.json` (e.g. the HF checkpoint) whose vocabulary and special-token ids
    the data uses (`data_pipelines.text.DirTokenizer`); None = the bundled Qwen BPE (Qwen2-VL/3-VL ids)."""
    patch_size: int = 14
    """ViT patch size in pixels (interpolated from the model config)."""
    temporal_patch_size: int = 2
    """Frames per temporal patch; an image is repeated this many times."""
    merge_size: int = 2
    """Spatial merge factor of the projector (2 → 2×2 patches become one LLM token)."""
    min_pixels: int = 56 * 56
    """Lower pixel bound of `smart_resize`."""
    max_pixels: int = 28 * 28 * 1280
    """Upper pixel bound of `smart_resize` (caps the visual tokens of one image)."""
    fast_decode: bool = False
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg draft mode) when its smart_resize target is at
    least that much smaller, then resize as usual. Faster on large photos; the pixels then differ
    slightly from the HF reference (measured in benchmarks/RESULTS.md), so it is off by default."""
    trace: bool = False
    """Write `output_dir/data_trace/dp{R}.jsonl` with the sample ids of every micro-batch."""
    cache_dir: Optional[str] = None
    """Node-local directory that keeps whole copies of shards that can only be streamed (`pipe:`
    sources, and remote shards of an index without offsets), so each is downloaded once per node and
    then read by offset; shared safely by the ranks of one node (docs/data.md "Reading by range").
    None: stream them on every read."""
    cache_max_gb: float = 100.0
    """Size bound of `cache_dir` in GiB; the least recently used shards are removed beyond it."""
    max_bad_fraction: float = 0.01
    """Stop the run when more than this fraction of samples read in a window was unusable."""
    bad_window: int = 1000
    """Samples per rank in the window that `max_bad_fraction` is checked over: on every sample, the run stops
    once its bad samples exceed max_bad_fraction × bad_window (docs/data.md "Untrusted and broken data")."""
    pack_lookahead: int = 16
    """Candidates the packer looks ahead to fill a micro-batch (best fit); part of the data order."""
    balance: str = "compute"
    """How the samples of one step are spread over its micro-batches (and so over dp ranks), after
    packing by tokens: `compute` evens out the FLOPs of the model being trained (the FLOP model the
    training side hands the loader, the count MFU uses: `qvl_train.monitor.flops.SampleFlops`; a
    loader built without one evens out tokens), `tokens` evens out token counts, `none` keeps the
    packing order. Never changes which samples form a step, nor the token budget; safe to change on
    resume."""
    plan_ahead: bool = True
    """Plan step S+1 in a background thread while step S trains (the plan is identical to planning
    inline; it is not part of the loader state, so resume stays exact)."""
    num_workers: Any = "auto"
    """Decode processes per rank (docs/data.md "Decode workers"): `auto` (default) takes the CPUs the
    job really has (SLURM_CPUS_PER_TASK × tasks on the node, the cgroup quota, the CPU affinity: the
    fewest), divides them by the ranks on the node and keeps one core per rank for the training loop
    (`data_pipelines.workers.resolve_num_workers`; the training run logs the value and its source once).
    0 builds samples (image decode, preprocessing, tokens, positions) inline in the training process
    when a step asks for them; N > 0 builds the samples of the next `prefetch_steps` steps in N worker
    processes while the current step trains (bit-identical batches). A StepLoader built directly
    (tools, tests) with `auto` builds inline; only the training run resolves it."""
    prefetch_steps: int = 2
    """With workers: how many steps beyond the current one are read and built ahead (each holds one
    step's samples of this rank in memory). The rule: one step ahead hides the build when the workers
    build a step at least as fast as the model trains one; the second absorbs steps whose samples take
    longer than average (large images, videos), so a step never waits while the loader keeps up on
    average. Prefetched work is never part of the loader state; skips are counted when a step is
    consumed."""
    video_fps: float = 2.0
    """Frames per second sampled from a video (the HF video processors' `fps`); with T = 2 frames per
    temporal patch, Qwen2.5-VL's `second_per_grid` is `2 / video_fps`."""
    video_min_frames: int = 4
    """Fewest frames sampled from a video (short clips are sampled more densely, up to all frames)."""
    video_max_frames: int = 768
    """Most frames sampled from one video (caps its temporal patches at video_max_frames / 2)."""
    video_min_pixels: Optional[int] = None
    """Lower pixel bound of a video's resize; None = the generation's video default (Qwen2/2.5-VL:
    128*28*28 per frame; Qwen3-VL: 128*32*32 over all frames together)."""
    video_max_pixels: Optional[int] = None
    """Upper pixel bound of a video's resize; None = the generation's video default (Qwen2/2.5-VL:
    28*28*768 per frame; Qwen3-VL: 32*32*768 over all frames together, i.e. t*h*w)."""

    def __post_init__(self) -> None:
        from data_pipelines import generations  # the registry imports the vision module, which is heavier

        generations.check(self.generation)
        if self.max_tokens < 64:
            raise ValueError(f"data.max_tokens={self.max_tokens} is too small; use at least 64")
        if not self.sources:
            raise ValueError("data.sources is empty; give at least one shard directory")
        if self.max_pixels < self.min_pixels:
            raise ValueError("data.max_pixels must be >= data.min_pixels")
        if not isinstance(self.fast_decode, bool):
            raise ValueError(f"data.fast_decode={self.fast_decode!r} must be true or false")
        if self.balance not in ("compute", "tokens", "none"):
            raise ValueError(f"data.balance={self.balance!r}; valid: compute, tokens, none")
        if self.pack_lookahead < 1:
            raise ValueError("data.pack_lookahead must be >= 1")
        if self.bad_window < 1:
            raise ValueError("data.bad_window must be >= 1")
        if not self.video_fps > 0:
            raise ValueError(f"data.video_fps={self.video_fps} must be > 0 (frames sampled per second)")
        if not 1 <= self.video_min_frames <= self.video_max_frames:
            raise ValueError(
                f"data.video_min_frames={self.video_min_frames} and data.video_max_frames={self.video_max_frames} "
                "must satisfy 1 <= min <= max"
            )
        if (self.video_min_pixels is not None and self.video_max_pixels is not None
                and self.video_max_pixels < self.video_min_pixels):
            raise ValueError("data.video_max_pixels must be >= data.video_min_pixels")
        self._check_workers()
        self._check_source_caps()
        if not (isinstance(self.cache_max_gb, (int, float)) and not isinstance(self.cache_max_gb, bool)
                and math.isfinite(self.cache_max_gb) and self.cache_max_gb > 0):
            raise ValueError(f"data.cache_max_gb={self.cache_max_gb!r} must be a size in GiB > 0")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            raise ValueError(f"data.cache_dir={self.cache_dir!r} must be a directory path (or null for no cache)")

    def for_source(self, source: "DataSource") -> "DataConfig":
        """The settings one source's samples are planned and built with: its `max_pixels` for images
        and its `max_frames` capping the frames sampled from a video (planner and loader both use this,
        so planned and built token counts agree)."""
        out = self
        if source.max_pixels is not None:
            out = replace(out, max_pixels=source.max_pixels)
        if source.max_frames is not None and source.max_frames < out.video_max_frames:
            out = replace(out, video_max_frames=source.max_frames,
                          video_min_frames=min(out.video_min_frames, source.max_frames))
        return out

    def _check_workers(self) -> None:
        """Decode-worker keys: `auto` or whole numbers in range (a bool is not a count)."""
        if isinstance(self.num_workers, str) and self.num_workers.strip().isdigit():
            self.num_workers = int(self.num_workers)  # e.g. from an environment interpolation
        if isinstance(self.num_workers, str) and self.num_workers == "auto":
            keys: tuple = (("prefetch_steps", 1),)
        else:
            keys = (("num_workers", 0), ("prefetch_steps", 1))
        for key, low in keys:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{key}={value!r} must be " + ("`auto` or " if key == "num_workers" else "")
                                 + f"an integer >= {low}")
        if isinstance(self.num_workers, int) and self.num_workers > 64:
            raise ValueError(
                f"data.num_workers={self.num_workers} is per rank; more than 64 decode processes per rank "
                "is a mistake (use consumption / per-worker rate, see docs/data.md \"Decode workers\")"
            )

    def _check_source_caps(self) -> None:
        """Per-source caps must make sense next to the run-wide ones."""
        for key, sources in (("sources", self.sources), ("valid", self.valid)):
            for i, src in enumerate(sources):
                if src.max_tokens is not None and src.max_tokens > self.max_tokens:
                    raise ValueError(
                        f"data.{key}[{i}].max_tokens={src.max_tokens} exceeds data.max_tokens={self.max_tokens} "
                        "(one packed sequence); lower it or drop it"
                    )
                if src.max_pixels is not None and src.max_pixels < self.min_pixels:
                    raise ValueError(
                        f"data.{key}[{i}].max_pixels={src.max_pixels} is below data.min_pixels={self.min_pixels}; "
                        "raise it or lower data.min_pixels"
                    )


@dataclass
class PackedBatch:
    """One packed micro-batch (see module docstring). Shapes: L = max_tokens, P = patches, k = media.

    Pixels travel as bytes: the loader's batches hold `pixel_values` as uint8 codes (the resized
    pixels in patch order, 1 byte per value instead of 4) and `pixel_lut`, the table that maps a code to
    the float the model takes. `to(device)` — which every engine calls before the forward — moves the
    batch and then normalises there (`normalised`: a gather, bit-identical to the HF processors), so the
    normalisation runs on the GPU and the loader ships a quarter of the bytes. A batch whose
    pixel_values are already floats (`pixel_lut` None: tools, tests, tiny.py) is left as it is.
    """

    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64: target of the prediction at i (next token, pre-shifted per sample); IGNORE_INDEX = no loss
    position_ids: torch.Tensor  # [3, L] int64 (t, h, w); text tokens have t = h = w; restart per sample
    cu_seqlens: torch.Tensor  # [n+1] int32 over the real samples; cu_seqlens[-1] == num_tokens
    pixel_values: torch.Tensor  # [P, C*T*p*p] float32, or uint8 codes with pixel_lut; rows (t, h-block, w-block, mh, mw)
    grid_thw: torch.Tensor  # [k, 3] int64, one row per image / video, in token order
    sample_ids: list[str]  # [n] stable ids, for exact resume and auditing
    num_tokens: int = 0  # real tokens (text + visual), no padding
    num_label_tokens: int = 0  # tokens with labels != IGNORE_INDEX
    num_visual_tokens: int = 0  # LLM tokens that carry visual embeddings
    media_kind: Optional[torch.Tensor] = None  # [k] int64: 0 image, 1 video (None = all images)
    pixel_lut: Optional[torch.Tensor] = None  # [2, C, 256] float32: code v of channel c of a kind-k medium is pixel_lut[k, c, v]

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def num_slots(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The batch on `device`, as the model takes it: moved, then its uint8 codes normalised there."""
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return PackedBatch(**moved).normalised()

    def normalised(self) -> "PackedBatch":
        """This batch with float32 `pixel_values` on their device (itself when they are floats already)."""
        if self.pixel_lut is None:
            return self
        pix = normalise_pixels(self.pixel_values, self.pixel_lut, self.grid_thw, self.media_kind)
        return replace(self, pixel_values=pix, pixel_lut=None)


ROWS_PER_GATHER = 16384
"""Patch rows normalised per gather: bounds the int32 index temporary (~100 MB at 1,536 columns)."""


def normalise_pixels(
    codes: torch.Tensor, lut: torch.Tensor, grid_thw: torch.Tensor, media_kind: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """uint8 codes [P, C*T'*k] → float [P, C*T'*k]: value v in channel c of a row of a kind-K medium becomes
    `lut[K, c, v]` (columns are channel-major, so channel = column // (columns / C)). Runs on the codes'
    device (`lut`, `grid_thw` and `media_kind` are moved there; no host sync): one gather per
    `ROWS_PER_GATHER` rows, exact by construction."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"normalise_pixels expects uint8 codes [P, D], got {codes.dtype} {tuple(codes.shape)}")
    device, (rows, cols) = codes.device, codes.shape
    kinds, chans = lut.shape[0], lut.shape[1]
    if cols % chans:
        raise ValueError(f"pixel_values has {cols} columns, not a multiple of the {chans} channels of pixel_lut")
    flat = lut.to(device).reshape(-1)
    col_offset = (torch.arange(cols, device=device, dtype=torch.int32) // (cols // chans)) * 256  # [D]
    row_offset = None  # [P, 1]: where the table of each row's media kind starts
    if media_kind is not None and kinds > 1 and rows:
        per_medium = grid_thw.to(device).prod(-1)
        kind = torch.repeat_interleave(media_kind.to(device), per_medium, output_size=rows)
        row_offset = (kind.to(torch.int32) * (chans * 256))[:, None]
    out = torch.empty((rows, cols), dtype=lut.dtype, device=device)
    for a in range(0, rows, ROWS_PER_GATHER):
        b = min(rows, a + ROWS_PER_GATHER)
        idx = codes[a:b].to(torch.int32).add_(col_offset)
        if row_offset is not None:
            idx.add_(row_offset[a:b])
        torch.index_select(flat, 0, idx.view(-1), out=out[a:b].view(-1))
    return out
