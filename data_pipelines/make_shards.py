"""Convert the data sets users already have into training shards.

    python -m data_pipelines.make_shards --format qwen-finetune|llava|interleaved \\
        --input FILE.json|.jsonl --media-root DIR --out DIR [--samples-per-shard N] [--workers N] \\
        [--max-source-pixels P]

Formats
-------
* ``qwen-finetune`` — the official Qwen-VL finetune JSON: a list (``.json``) or one record per line
  (``.jsonl``) of ``{"id"?: ..., "image": path | [paths], "video"?: path | [paths],
  "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\nWhat is ..."}]}``.
  Every ``<image>`` tag becomes an image part at that place, in order, and every ``<video>`` tag a
  video part; the text around the tags is kept verbatim (the ``\\n`` after ``<image>`` too, as the
  official finetune script keeps it). A video is stored as its original file; its index row is the
  container metadata (frames, fps, size), read without decoding more than its first frame.
  Thinking samples: a ``gpt`` turn's chain of thought is taken from its ``reasoning`` (or
  ``reasoning_content``) string field, else from a ``<think>…</think>`` block in its ``value``, split
  off as the Qwen3 chat template does (reasoning = the text before ``</think>`` after ``<think>``,
  content = the text after it, leading newlines removed); it becomes the turn's ``reasoning``.
* ``llava`` — LLaVA's instruction JSON (``{"id", "image"?: path, "conversations": [...]}``): same
  roles, tag and reasoning rules; records without ``image`` are text-only samples.
* ``interleaved`` — OBELICS-style web documents, JSONL with aligned ``texts`` / ``images`` lists
  where exactly one of the two is null at each position. A document is pretraining text, so it
  becomes ONE assistant turn whose content interleaves the text and images in document order: all
  of its text carries loss (a system turn, e.g. Qwen2-VL's default one, does not). Images carry
  no loss, as everywhere.

Media paths are relative to ``--media-root`` (absolute paths are used as they are).

Nothing is dropped silently: every record becomes a sample or a rejection with a reason. Rejections
are named by the record's ``id`` field, else by its line number (``.jsonl``, 1-based) or its index
in the list (``.json``, 0-based), listed on screen and in ``OUT/report.json``. Reasons:

=====================  =============================================================
``bad_json_line``      a ``.jsonl`` line that is not a JSON object
``bad_record``         fields missing or of the wrong type (e.g. unknown ``from`` role)
``empty_conversation`` no turns, only empty text, or no assistant turn to train on
``missing_file``       an image or video path that does not exist under --media-root
``undecodable_image``  Pillow cannot decode the file (truncated, not an image, ...)
``pixel_limit``        the header claims more pixels than --max-source-pixels
                       (decompression bomb guard: checked before decoding)
``aspect_ratio``       longer side / shorter side over 200 (Qwen's smart_resize limit)
``too_many_tags``      more ``<image>`` tags than images, or ``<video>`` tags than videos
``too_few_tags``       fewer ``<image>`` tags than images, or ``<video>`` tags than videos
``unreadable_video``   a video file that cannot be opened or decoded, or holds 0 frames
``duplicate_id``       the same ``id`` appeared earlier in the input (ids must be unique)
=====================  =============================================================

``--workers N`` reads and validates media in N processes; the output is identical for any N (results
are written in input order). Shards are written atomically by ``ShardWriter``; ``index.json`` last.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from PIL import Image

from data_pipelines.shards import ShardWriter
from data_pipelines.video import BadVideo, decode_frames, probe_video
from data_pipelines.vision import MAX_SOURCE_PIXELS

FORMATS = ("qwen-finetune", "llava", "interleaved")
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
_TAGS = re.compile("(<image>|<video>)")
MAX_ASPECT_RATIO = 200
REASONS = {
    "bad_json_line": "bad JSON line",
    "bad_record": "malformed record",
    "empty_conversation": "empty conversation",
    "missing_file": "missing file",
    "undecodable_image": "undecodable image",
    "pixel_limit": "image over the pixel limit (decompression bomb guard)",
    "aspect_ratio": f"image aspect ratio over {MAX_ASPECT_RATIO}",
    "too_many_tags": "more <image>/<video> tags than images/videos",
    "too_few_tags": "fewer <image>/<video> tags than images/videos",
    "unreadable_video": "unreadable or 0-frame video",
    "duplicate_id": "duplicate id",
}
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class Reject(Exception):
    """A record that cannot become a sample; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{REASONS[reason]}: {detail}" if detail else REASONS[reason])
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    """One input record and how the report names it."""

    label: str  # "id=..." / "line 12" / "index 3"
    sample_id: str
    data: Any  # parsed JSON, or None when the line was not JSON
    error: str = ""  # parse error of a bad JSON line


# ------------------------------------------------------------------------------------ reading
def read_records(path: str) -> tuple[list[Record], int]:
    """Parse the input file into records; returns (records, total). Raises SystemExit on a file
    that cannot be read as a whole (with what to do about it)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --input {path} does not exist; pass the JSON/JSONL file to convert")
    stem = os.path.splitext(os.path.basename(path))[0]
    records: list[Record] = []
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    if not isinstance(data, dict):
                        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                except ValueError as e:
                    records.append(Record(f"line {lineno}", f"{stem}-{lineno}", None, str(e)[:200]))
                    continue
                records.append(_record(data, f"line {lineno}", f"{stem}-{lineno}"))
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as e:
            raise SystemExit(
                f"error: {path} is not valid JSON ({e}). A .json input must hold one list of records; "
                "use .jsonl (one record per line) to convert files with some broken records."
            ) from e
        if not isinstance(data, list):
            raise SystemExit(f"error: {path} must hold a JSON list of records, found {type(data).__name__}")
        for i, rec in enumerate(data):
            records.append(_record(rec, f"index {i}", f"{stem}-{i}"))
    else:
        raise SystemExit(f"error: --input {path} must end in .json (a list of records) or .jsonl (one per line)")
    return records, len(records)


def _record(data: Any, where: str, default_id: str) -> Record:
    rid = data.get("id") if isinstance(data, dict) else None
    if rid is not None and str(rid).strip():
        return Record(f"id={rid} ({where})", str(rid), data)
    return Record(where, default_id, data)


# ---------------------------------------------------------------------------------- converting
def _paths(data: dict, field: str) -> list[str]:
    """A record's `image` / `video` field (a path or a list of paths; also `images` / `videos`)."""
    value = data.get(field, data.get(field + "s"))
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return list(value)
    raise Reject("bad_record", f"'{field}' must be a path or a list of paths, got {type(value).__name__}")


def convert_conversations(data: dict, fmt: str) -> tuple[list[dict], list[str], list[str]]:
    """qwen-finetune / llava record → (messages with image parts named img{i} and video parts named
    vid{i}, image paths, video paths)."""
    paths = _paths(data, "image")
    videos = _paths(data, "video")
    convs = data.get("conversations")
    if convs is None:
        raise Reject("empty_conversation", "no 'conversations' field")
    if not isinstance(convs, list):
        raise Reject("bad_record", "'conversations' must be a list of {from, value}")
    messages: list[dict] = []
    n_tags = n_video_tags = 0
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value", ""), str):
            raise Reject("bad_record", f"turn {k} must be {{'from': ..., 'value': str}}")
        role = ROLE_MAP.get(str(turn.get("from", "")).lower())
        if role is None:
            raise Reject("bad_record", f"turn {k} has unknown 'from'={turn.get('from')!r}; use human, gpt or system")
        value, reasoning = turn_reasoning(turn, role, k)
        parts: list[dict] = []
        pieces = _TAGS.split(value)  # text, tag, text, tag, ..., text
        for piece in pieces:
            if piece == IMAGE_TAG:
                parts.append({"type": "image", "name": f"img{n_tags}"})  # extension added later
                n_tags += 1
            elif piece == VIDEO_TAG:
                parts.append({"type": "video", "name": f"vid{n_video_tags}"})
                n_video_tags += 1
            elif piece:
                parts.append({"type": "text", "text": piece})
        if role != "user" and len(pieces) > 1:
            raise Reject("bad_record", f"turn {k} ({turn.get('from')}) holds an <image>/<video> tag; only human turns may")
        messages.append({"role": role, "content": parts})
        if reasoning is not None:
            messages[-1]["reasoning"] = reasoning
    if not messages or not any(p["type"] == "text" and p["text"].strip() for m in messages for p in m["content"]):
        raise Reject("empty_conversation", "no turns with text")
    if not any(m["role"] == "assistant" and (m["content"] or m.get("reasoning")) for m in messages):
        raise Reject("empty_conversation", "no assistant turn with text to train on")
    for tag, n, have, what in ((IMAGE_TAG, n_tags, len(paths), "images"), (VIDEO_TAG, n_video_tags, len(videos), "videos")):
        if n != have:
            raise Reject("too_many_tags" if n > have else "too_few_tags", f"{n} {tag} tags, {have} {what}")
    return messages, paths, videos


def turn_reasoning(turn: dict, role: str, k: int) -> tuple[str, Optional[str]]:
    """A turn's (value, reasoning): the `reasoning`/`reasoning_content` field, else a `<think>` block
    split off the value as the Qwen3 chat template splits it (None = not a thinking turn)."""
    value = turn.get("value", "")
    reasoning = turn.get("reasoning", turn.get("reasoning_content"))
    if reasoning is not None and not isinstance(reasoning, str):
        raise Reject("bad_record", f"turn {k}: 'reasoning' must be a string")
    if reasoning is None and role == "assistant" and "</think>" in value:
        reasoning = value.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        value = value.split("</think>")[-1].lstrip("\n")
    if reasoning is not None and role != "assistant":
        raise Reject("bad_record", f"turn {k} ({turn.get('from')}) has reasoning; only gpt turns may")
    return value, reasoning


def convert_interleaved(data: dict) -> tuple[list[dict], list[str]]:
    """OBELICS-style document → (one assistant turn interleaving text and images, image paths)."""
    texts, images = data.get("texts"), data.get("images")
    if not isinstance(texts, list) or not isinstance(images, list):
        raise Reject("bad_record", "an interleaved document needs 'texts' and 'images' lists")
    if len(texts) != len(images):
        raise Reject("bad_record", f"'texts' ({len(texts)}) and 'images' ({len(images)}) must be aligned")
    parts: list[dict] = []
    paths: list[str] = []
    for k, (t, im) in enumerate(zip(texts, images)):
        if (t is None) == (im is None):
            raise Reject("bad_record", f"position {k}: exactly one of texts[{k}] / images[{k}] must be null")
        if im is not None:
            if not isinstance(im, str):
                raise Reject("bad_record", f"images[{k}] must be a path")
            parts.append({"type": "image", "name": f"img{len(paths)}"})
            paths.append(im)
        elif not isinstance(t, str):
            raise Reject("bad_record", f"texts[{k}] must be a string")
        elif t:
            parts.append({"type": "text", "text": t})
    if not any(p["type"] == "text" and p["text"].strip() for p in parts):
        raise Reject("empty_conversation", "document has no text")
    return [{"role": "assistant", "content": parts}], paths


def _resolve(media_root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(media_root, path)


def load_image(path: str, max_source_pixels: int) -> tuple[bytes, str]:
    """Read and fully validate one image file → (encoded bytes, lower-case extension)."""
    if not os.path.isfile(path):
        raise Reject("missing_file", path)
    with open(path, "rb") as f:
        blob = f.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(blob))
            w, h = img.size
            if w * h > max_source_pixels:
                raise Reject("pixel_limit", f"{path}: {w}x{h} = {w * h} pixels > {max_source_pixels}")
            if w < 1 or h < 1:
                raise Reject("undecodable_image", f"{path}: size {w}x{h}")
            img.load()
            fmt = img.format or "PNG"
    except Reject:
        raise
    except Image.DecompressionBombError as e:
        raise Reject("pixel_limit", f"{path}: {e}") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise Reject("undecodable_image", f"{path}: {type(e).__name__}: {e}") from e
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise Reject("aspect_ratio", f"{path}: {w}x{h}")
    return blob, _EXT.get(fmt, fmt.lower())


def load_video(path: str) -> tuple[bytes, str]:
    """Read and check one video file → (encoded bytes, lower-case extension). The container metadata
    must be readable (frames, fps, size) and the first frame decodable; the rest is decoded at read time."""
    if not os.path.isfile(path):
        raise Reject("missing_file", path)
    with open(path, "rb") as f:
        blob = f.read()
    if not blob:
        raise Reject("unreadable_video", f"{path}: empty file (0 frames)")
    try:
        probe_video(blob)
        decode_frames(blob, [0])
    except BadVideo as e:
        raise Reject("unreadable_video", f"{path}: {e}") from e
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return blob, ext if re.fullmatch(r"[a-z0-9]{1,8}", ext) else "video"


def process_record(args: tuple[Record, str, str, int]) -> dict[str, Any]:
    """Worker: one record → {"ok": True, messages, images} or {"ok": False, reason, detail}."""
    rec, fmt, media_root, max_px = args
    try:
        if rec.data is None:
            raise Reject("bad_json_line", rec.error)
        if fmt == "interleaved":
            messages, paths = convert_interleaved(rec.data)
            video_paths: list[str] = []
        else:
            messages, paths, video_paths = convert_conversations(rec.data, fmt)
        videos: dict[str, bytes] = {}
        names: dict[str, str] = {}
        for i, p in enumerate(video_paths):
            blob, ext = load_video(_resolve(media_root, p))
            names[f"vid{i}"] = f"vid{i}.{ext}"
            videos[names[f"vid{i}"]] = blob
        images: dict[str, bytes] = {}
        for i, p in enumerate(paths):
            blob, ext = load_image(_resolve(media_root, p), max_px)
            names[f"img{i}"] = f"img{i}.{ext}"
            images[names[f"img{i}"]] = blob
        for m in messages:
            for part in m["content"]:
                if part["type"] in ("image", "video"):
                    part["name"] = names[part["name"]]
        return {"ok": True, "messages": messages, "images": images, "videos": videos}
    except Reject as e:
        return {"ok": False, "reason": e.reason, "detail": e.detail}
    except Exception as e:  # a bug or an input we did not foresee: still reported, never silent
        return {"ok": False, "reason": "bad_record", "detail": f"{type(e).__name__}: {e}"}


def _results(records: list[Record], fmt: str, media_root: str, max_px: int, workers: int) -> Iterator[dict]:
    jobs = ((r, fmt, media_root, max_px) for r in records)
    if workers <= 1:
        yield from map(process_record, jobs)
        return
    window = 64 * workers  # bounded memory: encoded images of at most this many records in flight
    with ProcessPoolExecutor(max_workers=workers) as pool:
        batch: list = []
        for job in jobs:
            batch.append(job)
            if len(batch) == window:
                yield from pool.map(process_record, batch, chunksize=8)
                batch = []
        if batch:
            yield from pool.map(process_record, batch, chunksize=8)


# ------------------------------------------------------------------------------------ driving
def make_shards(
    fmt: str, input_path: str, media_root: str, out_dir: str, *, samples_per_shard: int = 1000, workers: int = 1,
    max_source_pixels: int = MAX_SOURCE_PIXELS, progress: bool = True,
) -> dict[str, Any]:
    """Convert `input_path` into shards in `out_dir`; returns the report (also written to report.json)."""
    if fmt not in FORMATS:
        raise SystemExit(f"error: --format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if not os.path.isdir(media_root):
        raise SystemExit(f"error: --media-root {media_root} is not a directory; pass the folder image paths are relative to")
    if samples_per_shard < 1 or workers < 1:
        raise SystemExit("error: --samples-per-shard and --workers must be >= 1")
    t0 = time.perf_counter()
    records, total = read_records(input_path)
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    os.makedirs(out_dir, exist_ok=True)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="sample", desc="make_shards", disable=not progress, file=sys.stderr)
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard) as writer:
        for rec, res in zip(records, _results(records, fmt, media_root, max_source_pixels, workers)):
            bar.update(1)
            if res["ok"] and rec.sample_id in seen:
                res = {"ok": False, "reason": "duplicate_id", "detail": rec.sample_id}
            if not res["ok"]:
                rejected.append({"record": rec.label, "reason": res["reason"], "message": REASONS[res["reason"]],
                                 "detail": res["detail"]})
                continue
            seen.add(rec.sample_id)
            writer.add(rec.sample_id, res["messages"], res["images"], res["videos"])
        bar.close()
    counts: dict[str, int] = {}
    for r in rejected:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    report = {
        "format": fmt, "input": os.path.abspath(input_path), "media_root": os.path.abspath(media_root),
        "out": os.path.abspath(out_dir), "records": total, "written": writer.num_samples,
        "rejected": len(rejected), "rejected_by_reason": dict(sorted(counts.items())),
        "shards": writer.shard_names, "seconds": round(time.perf_counter() - t0, 2), "rejections": rejected,
    }
    tmp = os.path.join(out_dir, ".report.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    os.replace(tmp, os.path.join(out_dir, "report.json"))
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"converted {report['written']} of {report['records']} records into {len(report['shards'])} shards "
        f"in {report['out']} ({report['seconds']} s); rejected {report['rejected']}"
        + (": " + ", ".join(f"{k} {v}" for k, v in report["rejected_by_reason"].items()) if report["rejected"] else "")
    ]
    for r in report["rejections"]:
        lines.append(f"  rejected {r['record']}: {r['message']}" + (f" ({r['detail']})" if r["detail"] else ""))
    lines.append(f"full report: {os.path.join(report['out'], 'report.json')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipelines.make_shards", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--input", required=True, help="FILE.json (a list of records) or FILE.jsonl (one per line)")
    ap.add_argument("--media-root", required=True, help="directory that image/video paths are relative to")
    ap.add_argument("--out", required=True, help="output shard directory (created)")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1, help="processes that read and validate media")
    ap.add_argument("--max-source-pixels", type=int, default=MAX_SOURCE_PIXELS,
                    help="reject images whose header claims more pixels (decompression bomb guard)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    report = make_shards(
        args.format, args.input, args.media_root, args.out, samples_per_shard=args.samples_per_shard,
        workers=args.workers, max_source_pixels=args.max_source_pixels, progress=not args.no_progress,
    )
    print("\n".join(summary_lines(report)))
    if report["written"] == 0:
        print("error: no record could be converted; fix the reasons above (see report.json) and rerun", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
