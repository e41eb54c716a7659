"""Shard format, writer and index of the training data.

Format
------
A source is a directory of WebDataset tar shards plus one `index.json`::

    DIR/shard-000000.tar, shard-000001.tar, ...
    DIR/index.json

A sample with key `K` (digits only: WebDataset splits keys at the first dot) is a group of members:

* `K.json` — UTF-8 JSON::

      {"id": "synth-000042",
       "messages": [{"role": "system"|"user"|"assistant",
                     "content": [{"type": "text", "text": "..."},
                                 {"type": "image", "name": "img0.png"},
                                 {"type": "video", "name": "vid0.mp4"},
                                 {"type": "box", "ref": "the red circle", "box": [x1, y1, x2, y2],
                                  "image": "img0.png"}]},    # grounding: pixels of the original image
                    {"role": "assistant", "reasoning": "...", "content": [...]}]}   # thinking sample

  `reasoning` (optional, assistant turns only, a string): the turn's chain of thought, rendered as a
  `<think>` block per generation by text.py (see `text.think_blocks`); `content` stays the answer.

* `K.img0.png`, `K.img1.jpg`, ... — the encoded images named by the `image` parts (lower-case
  names; PNG/JPEG/anything Pillow decodes). Never pickles: the reader only parses JSON and images.
* `K.vid0.mp4`, ... — the encoded videos named by the `video` parts, stored as they came (any
  container/codec PyAV decodes); frames are sampled and resized at read time (video.py).

`index.json` lets the stream plan and pack without opening any tar::

    {"version": 1,
     "shards": [{"name": "shard-000000.tar",
                 "samples": [{"id": str, "key": str,
                              "n_text_tokens": int,   # template tokens, no image pads,
                                                      # with <|vision_start|>/<|vision_end|>
                              "n_text_tokens_by_generation"?: {"qwen3_vl": int, ...},
                              "images": [[h, w], ...],
                              "videos": [[frames, fps, h, w], ...],   # only when it has videos
                              "offset": int,                          # its first tar header
                              "members": {"json": [data_offset, size], "img0.png": [...], ...}}],
                 "size": int}]}                                       # bytes of the tar

`offset`, `members` and `size` (written here, or added by `python -m data_pipelines.reindex DIR`) let
the loader read exactly a sample's bytes (data_pipelines/ranged.py); an index without them is
streamed. `check_offsets` vets them when an index is read.

`n_text_tokens` is the largest count over the generations' chat templates; the optional
`n_text_tokens_by_generation` holds the generations whose count is smaller (e.g. Qwen3-VL, which adds
no default system turn). `text_tokens(entry, generation)` picks the right one. Video rows are the
container metadata (`video.probe_video`, no frame decoded); the planner derives the sampled frames,
grid and tokens from them under the run's `data.video_*` settings. A sample's planned token cost is
`text_tokens + sum(image_token_count(h, w))` under the run's `min_pixels`/`max_pixels` (plus each
video's tokens, `packing.GlobalPlanner.video_plans`), so the same shards serve any generation and
resolution setting.

Writing is atomic: each tar and the index are written to a temporary name and renamed, so a crash
never leaves a truncated shard under a final name; the index is written last (a directory with
`index.json` is complete).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image

from data_pipelines import generations
from data_pipelines.text import (
    QwenTokenizer,
    get_tokenizer,
    message_parts,
    think_blocks,
    validate_box,
)
from data_pipelines.video import probe_video

INDEX_NAME = "index.json"
INDEX_VERSION = 1
_IMAGE_NAME = re.compile(r"^[a-z0-9_\-]+(\.[a-z0-9_\-]+)+$")


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


@dataclass
class _OpenShard:
    name: str
    tmp_path: str
    tar: tarfile.TarFile
    samples: list[dict[str, Any]] = field(default_factory=list)


class ShardWriter:
    """Write samples into `out_dir/shard-NNNNNN.tar` (atomically) and `out_dir/index.json`.

    Use as a context manager; `add()` one sample at a time. Keys are the running sample number
    (zero-padded), so they are unique within the directory and dot-free.
    """

    def __init__(self, out_dir: str, samples_per_shard: int = 1000, tokenizer: Optional[QwenTokenizer] = None):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.tok = tokenizer or get_tokenizer()
        os.makedirs(out_dir, exist_ok=True)
        self._shards: list[dict[str, Any]] = []
        self._open: Optional[_OpenShard] = None
        self._count = 0
        self._closed = False

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no temp files behind and no index: the directory is incomplete
            self._abort()

    @property
    def num_samples(self) -> int:
        return self._count

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self._shards]

    def add(
        self, sample_id: str, messages: list[dict[str, Any]], images: dict[str, bytes | Image.Image],
        videos: Optional[dict[str, bytes]] = None,
    ) -> str:
        """Add one sample; `images` maps each image part's `name` to encoded bytes or a PIL image
        (PIL images are stored as PNG), `videos` each video part's `name` to its encoded file (its
        metadata must be readable: video.BadVideo otherwise). Returns the sample's key."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        names = [p["name"] for m in messages for p in message_parts(m) if p.get("type") == "image"]
        if sorted(names) != sorted(images) or len(set(names)) != len(names):
            raise ValueError(f"sample {sample_id}: image parts {names} do not match images {sorted(images)}")
        sizes: list[list[int]] = []
        blobs: dict[str, bytes] = {}
        for name in names:
            if not _IMAGE_NAME.match(name):
                raise ValueError(f"image name {name!r} must be lower-case like 'img0.png'")
            img = images[name]
            if isinstance(img, Image.Image):
                buf = io.BytesIO()
                img.save(buf, format="PNG", compress_level=1)
                blob, (w, h) = buf.getvalue(), img.size
            else:
                blob = bytes(img)
                with Image.open(io.BytesIO(blob)) as probe:  # header only
                    w, h = probe.size
            blobs[name] = blob
            sizes.append([h, w])
        video_rows = self._videos(sample_id, messages, videos or {})

        try:
            think_blocks(messages)
        except ValueError as e:
            raise ValueError(f"sample {sample_id}: {e}") from e
        by_name = dict(zip(names, sizes))
        for part in (p for m in messages for p in message_parts(m) if p.get("type") == "box"):
            try:
                x1, y1, x2, y2 = validate_box(part)
                target = part.get("image", names[0] if len(names) == 1 else None)
                if target not in by_name:
                    raise ValueError(f"its 'image' {target!r} must name one of this sample's images {names}")
                h, w = by_name[target]
                if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
                    raise ValueError(f"box {part['box']} lies outside its {w}x{h} (w x h) image {target}")
            except ValueError as e:
                raise ValueError(f"sample {sample_id}: bad box part: {e}") from e

        if self._open is None:
            self._start_shard()
        key = f"{self._count:09d}"
        doc = {"id": sample_id, "messages": messages}
        start = self._open.tar.offset  # the sample's first tar header
        members = {"json": self._put(f"{key}.json", json.dumps(doc, ensure_ascii=False).encode("utf-8"))}
        for name in names:
            members[name] = self._put(f"{key}.{name}", blobs[name])
        for name in video_rows:
            members[name] = self._put(f"{key}.{name}", bytes(videos[name]))
        entry = index_entry(sample_id, key, self.tok.text_token_counts(messages), sizes)
        if video_rows:
            entry["videos"] = list(video_rows.values())
        entry["offset"], entry["members"] = start, members
        self._open.samples.append(entry)
        self._count += 1
        if len(self._open.samples) >= self.samples_per_shard:
            self._finish_shard()
        return key

    def close(self) -> str:
        """Finish the last shard and write index.json; returns the index path."""
        if self._closed:
            return os.path.join(self.out_dir, INDEX_NAME)
        if self._open is not None:
            self._finish_shard()
        path = write_index(self.out_dir, self._shards)
        self._closed = True
        return path

    # ------------------------------------------------------------------------------- internals
    @staticmethod
    def _videos(sample_id: str, messages: list[dict[str, Any]], videos: dict[str, bytes]) -> dict[str, list]:
        """Video part name → index row `[frames, fps, h, w]`, in order of appearance (header only)."""
        names = [p["name"] for m in messages for p in message_parts(m) if p.get("type") == "video"]
        if sorted(names) != sorted(videos) or len(set(names)) != len(names):
            raise ValueError(f"sample {sample_id}: video parts {names} do not match videos {sorted(videos)}")
        rows = {}
        for name in names:
            if not _IMAGE_NAME.match(name):
                raise ValueError(f"video name {name!r} must be lower-case like 'vid0.mp4'")
            rows[name] = probe_video(bytes(videos[name])).as_index()
        return rows

    def _start_shard(self) -> None:
        name = shard_name(len(self._shards))
        tmp = os.path.join(self.out_dir, f".{name}.tmp")
        self._open = _OpenShard(name=name, tmp_path=tmp, tar=tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT))

    def _put(self, member: str, data: bytes) -> list[int]:
        """Append one member; returns its `[data_offset, size]` in the tar (for ranged reads)."""
        info = tarfile.TarInfo(member)
        info.size = len(data)
        info.mtime = 0  # deterministic bytes for identical inputs
        info.mode = 0o644
        tar = self._open.tar
        tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return [tar.offset - padded, len(data)]  # the data ends the member's padded blocks

    def _finish_shard(self) -> None:
        sh = self._open
        sh.tar.close()
        final = os.path.join(self.out_dir, sh.name)
        os.replace(sh.tmp_path, final)
        self._shards.append({"name": sh.name, "size": os.path.getsize(final), "samples": sh.samples})
        self._open = None

    def _abort(self) -> None:
        if self._open is not None:
            self._open.tar.close()
            if os.path.exists(self._open.tmp_path):
                os.remove(self._open.tmp_path)
            self._open = None
        self._closed = True


def index_entry(sample_id: str, key: str, counts: dict[str, int], sizes: list[list[int]]) -> dict[str, Any]:
    """One sample's index entry from its per-generation text token counts (`text_token_counts`)."""
    most = max(counts.values())
    entry: dict[str, Any] = {"id": sample_id, "key": key, "n_text_tokens": most}
    smaller = {key: n for key, n in counts.items() if n < most}
    if smaller:
        entry["n_text_tokens_by_generation"] = smaller
    entry["images"] = sizes
    return entry


def text_tokens(entry: dict[str, Any], generation: str) -> int:
    """Planned text tokens of an index entry under `generation` (exact, or an upper bound with boxes)."""
    key = generations.get(generation).count_key
    return int(entry.get("n_text_tokens_by_generation", {}).get(key, entry["n_text_tokens"]))


def write_index(out_dir: str, shards: list[dict[str, Any]]) -> str:
    """Atomically write `out_dir/index.json` for the given shard entries."""
    path = os.path.join(out_dir, INDEX_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": INDEX_VERSION, "shards": shards}, f, ensure_ascii=False, separators=(",", ":"))
    os.replace(tmp, path)
    return path


def read_index(source_dir: str) -> dict[str, Any]:
    """Load and validate `source_dir/index.json`."""
    path = os.path.join(source_dir, INDEX_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a data source must be a shard directory with index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    return validate_index(index, path)


SAFE_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}\.tar")
"""What a shard name in an index may be: a plain file name of letters, digits, `.`, `_`, `-` ending
in `.tar` (no `/`, no `..` path, no whitespace, quote, shell metacharacter or control character)."""


def check_shard_name(name: Any, where: str) -> str:
    """Refuse a shard name that is not a plain `*.tar` file name (`SAFE_SHARD_NAME`). An index is
    untrusted input: its names are joined to a shard directory and substituted into `pipe:` commands,
    so `../../x.tar` or `a.tar; rm -rf ~` must never reach a path or a shell."""
    if not isinstance(name, str) or not SAFE_SHARD_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{where}: shard entry name {name!r} is not a plain shard file name (allowed: letters, digits, '.', "
            "'_', '-', ending in .tar; no '/', '..', spaces or shell characters). The index may be corrupt or "
            "malicious: regenerate it (python -m data_pipelines.reindex DIR) after renaming the shard files"
        )
    return name


def validate_index(index: Any, where: str) -> dict[str, Any]:
    """Check a loaded index (from a file or a URL, `where`) and return it."""
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        version = index.get("version") if isinstance(index, dict) else None
        raise ValueError(f"{where}: unsupported index version {version!r}")
    if not isinstance(index.get("shards"), list) or not all(isinstance(sh, dict) for sh in index["shards"]):
        raise ValueError(f"{where}: 'shards' must be a list of shard entries")
    for sh in index["shards"]:
        check_shard_name(sh.get("name"), where)
        for s in sh["samples"]:
            if not {"id", "key", "n_text_tokens", "images"} <= s.keys():
                raise ValueError(f"{where}: sample entry {s} lacks required fields")
        check_offsets(sh, where)
    return index


def check_offsets(shard: dict[str, Any], where: str) -> None:
    """The optional byte offsets of one shard entry (`size`; per sample `offset`, `members`): whole
    numbers, members block-aligned after their header and inside the shard. Raises ValueError naming
    the entry and how to fix it (`python -m data_pipelines.reindex DIR` rewrites them)."""
    fix = "rewrite them with: python -m data_pipelines.reindex DIR"
    size = shard.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"{where}: shard {shard.get('name')!r} has size {size!r}, not a byte count; {fix}")
    for s in shard["samples"]:
        members = s.get("members")
        if members is None:
            continue
        bad = None
        if not isinstance(members, dict) or not members:
            bad = "members must be a non-empty {ext: [data_offset, size]} object"
        else:
            for ext, span in members.items():
                ok = (isinstance(ext, str) and ext and "/" not in ext and isinstance(span, list) and len(span) == 2
                      and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in span))
                if not ok:
                    bad = f"member {ext!r}: {span!r} is not [data_offset, size]"
                elif span[0] < tarfile.BLOCKSIZE or span[0] % tarfile.BLOCKSIZE:
                    bad = f"member {ext!r}: data offset {span[0]} is not a tar data block (a multiple of 512 after a header)"
                elif size is not None and span[0] + span[1] > size:
                    bad = f"member {ext!r}: bytes {span[0]}..{span[0] + span[1]} lie past the shard's {size} bytes"
                if bad:
                    break
        offset = s.get("offset")
        if bad is None and offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
            bad = f"offset {offset!r} is not a byte offset"
        if bad:
            raise ValueError(f"{where}: shard {shard.get('name')!r} sample {s.get('key')!r}: {bad}; {fix}")

