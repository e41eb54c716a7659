"""Convert the data sets users already have into training shards.

    python -m data_pipelines.make_shards --format qwen-finetune|llava|interleaved \\
        --input FILE.json|.jsonl [--media-root DIR] --out DIR [--samples-per-shard N] [--workers N] \\
        [--max-source-pixels P] [--overwrite]

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
  The same format also reads the released Qwen-VL (v1) ``finetune.py`` records, whose images are
  inline spans instead of an ``image`` field: ``{"id": ..., "conversations": [{"from": "user", "value":
  "Picture 1: <img>path/to/img.jpg</img>\\nWhat is ...?"}, {"from": "assistant", "value": "..."}]}``.
  Each ``<img>PATH</img>`` span of a user turn becomes an image member (PATH resolved like every other
  media path, below) and an image part at that place; the text around it is kept verbatim (``Picture
  1: `` and the ``\\n`` after the span, as Qwen-VL's ``from_list_format`` writes them), so each
  generation's template renders its own image tokens there (Qwen-VL: ``<img>`` + 256 ``<imgpad>`` +
  ``</img>``). ``<image>`` tags and ``<img>`` spans may be mixed; images are numbered in order of
  appearance. Qwen-VL's grounding is kept as box parts (the shard's canonical box, pixel coordinates
  in the original image): ``<ref>R</ref><box>(x1,y1),(x2,y2)</box>`` becomes ``{"type": "box", "ref":
  R, "box": [x1·W/1000, y1·H/1000, x2·W/1000, y2·H/1000], "image": <the latest image before it>}``
  with W×H the size of that image (Qwen-VL's coordinates are ``floor(x/W·1000)`` on [0, 1000); the
  pixel value is the left edge of that bin, so rendering it back for ``qwen_vl`` / ``qwen2_vl``
  gives the original numbers exactly (1000, which Qwen-VL never writes, becomes 999), ``qwen3_vl`` the same numbers on [0,
  1000], ``qwen2_5_vl`` the
  pixels of its resized image). A ``<box>`` without a ``<ref>`` before it becomes a box with an empty
  ``ref``; a ``<ref>R</ref>`` without a ``<box>`` after it (a referring expression in a question)
  keeps R as plain text (a box part is the only form of grounding markup in a shard).
* ``llava`` — LLaVA's instruction JSON (``{"id", "image"?: path, "conversations": [...]}``): same
  roles, tag and reasoning rules; records without ``image`` are text-only samples.
* ``interleaved`` — OBELICS-style web documents, JSONL with aligned ``texts`` / ``images`` lists
  where exactly one of the two is null at each position. A document is pretraining text, so it
  becomes ONE assistant turn whose content interleaves the text and images in document order: all
  of its text carries loss (a system turn, e.g. Qwen2-VL's default one, does not). Images carry
  no loss, as everywhere.

Media paths are relative to ``--media-root`` (default: the input file's folder; absolute paths are
used as they are); a relative path that leaves ``--media-root`` (``../x.jpg``) is an ``outside_root``
rejection, a URL a ``missing_file`` one (download first).

Inline image references are never trained as text: any text (in every format, reasoning included)
that still looks like one after conversion — ``<img>…</img>`` (e.g. in LLaVA or interleaved data, or an
unclosed ``<img>``), an HTML ``<img …>``, or an ``<image>`` placeholder left over after the tags were
matched with the images (e.g. inside an interleaved document's text) — makes the record an
``inline_image`` rejection naming the reference.

``--out`` must not already hold shards: a folder with ``shard-*.tar``, ``index.json`` or
``report.json`` is refused (stale shards beside new ones would be trained on) unless ``--overwrite``,
which removes exactly those files (and this tool's leftover temporary files) first, nothing else.

Nothing is dropped silently: every record becomes a sample or a rejection with a reason (an
unforeseen exception on one record becomes a ``bad_record`` rejection with its type and message; the
run goes on and report.json is written). Rejections
are named by the record's ``id`` field, else by its line number (``.jsonl``, 1-based) or its index
in the list (``.json``, 0-based), listed on screen and in ``OUT/report.json``. Reasons:

=====================  =============================================================
``bad_json_line``      a ``.jsonl`` line that is not a JSON object (or nested too deeply to parse)
``bad_utf8``           a ``.jsonl`` line that is not valid UTF-8, or text with a lone surrogate
                       escape (``"\\ud800"``) that no UTF-8 file can hold (never repaired silently)
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
``video_pixel_limit``  a video whose header claims frames over --max-source-pixels (the images'
                       cap, at most video.MAX_VIDEO_FRAME_PIXELS) or frames × pixels over
                       video.MAX_VIDEO_TOTAL_PIXELS (8 Gi; checked before decoding, as training does)
``duplicate_id``       the same ``id`` appeared earlier in the input (ids must be unique)
``inline_image``       text that still looks like an inline image reference after conversion
                       (``<img>…</img>``, ``<img …>``, a leftover ``<image>``)
``outside_root``       a relative media path that leaves --media-root (``..``)
``bad_box``            a Qwen-VL ``<box>`` that is not ``(x1,y1),(x2,y2)`` on [0, 1000] with
                       x1 <= x2, y1 <= y2, or that no image precedes
=====================  =============================================================

``--workers N`` reads and validates media in N processes; the output is identical for any N (results
are written in input order). Shards are written atomically by ``ShardWriter``; ``index.json`` last.
"""

from __future__ import annotations

import argparse
import io
import json
import math
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
from data_pipelines.text import get_tokenizer
from data_pipelines.video import MAX_VIDEO_FRAME_PIXELS, MAX_VIDEO_TOTAL_PIXELS, BadVideo, VideoTooLarge, decode_frames, probe_video
from data_pipelines.vision import MAX_SOURCE_PIXELS

FORMATS = ("qwen-finetune", "llava", "interleaved")
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
_TAGS = re.compile("(<image>|<video>)")
# qwen-finetune also reads Qwen-VL (v1) inline images and grounding (module docstring)
_QWEN_TAGS = re.compile(r"(<image>|<video>|<img>[^<>\n]*</img>|(?:<ref>[^<>]*</ref>)?<box>[^<>]*</box>|<ref>[^<>]*</ref>)")
_IMG_SPAN = re.compile(r"<img>([^<>\n]*)</img>")
_REF_BOX = re.compile(r"(?:<ref>([^<>]*)</ref>)?<box>([^<>]*)</box>")
_BOX_COORDS = re.compile(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*")
_INLINE_IMAGE = re.compile(r"<img\b[^>]*>.*?</img>|</?img\b[^>]*>|<image>", re.I | re.S)
"""Text that still looks like an inline image reference after conversion (an `inline_image` rejection)."""
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
OUTPUT_FILES = re.compile(r"shard-\d+\.tar|\.shard-\d+\.tar\.tmp|index\.json(?:\.tmp)?|report\.json|\.report\.json\.tmp")
"""The files this tool writes into --out (the only ones --overwrite removes)."""
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
    "video_pixel_limit": "video over the pixel limit (per frame or frames x pixels)",
    "bad_utf8": "line is not valid UTF-8",
    "duplicate_id": "duplicate id",
    "inline_image": "inline image reference left in the text",
    "outside_root": "media path outside --media-root",
    "bad_box": "malformed Qwen-VL <box>",
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
    reason: str = "bad_json_line"  # the rejection of a line that could not be parsed


# ------------------------------------------------------------------------------------ reading
def read_records(path: str) -> tuple[list[Record], int]:
    """Parse the input file into records; returns (records, total). Raises SystemExit on a file
    that cannot be read as a whole (with what to do about it)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --input {path} does not exist; pass the JSON/JSONL file to convert")
    stem = os.path.splitext(os.path.basename(path))[0]
    records: list[Record] = []
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    records.append(Record(f"line {lineno}", f"{stem}-{lineno}", None, str(e)[:200], "bad_utf8"))
                    continue
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    if not isinstance(data, dict):
                        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
                    records.append(Record(f"line {lineno}", f"{stem}-{lineno}", None, f"{type(e).__name__}: {e}"[:200]))
                    continue
                records.append(_record(data, f"line {lineno}", f"{stem}-{lineno}"))
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, RecursionError) as e:
            raise SystemExit(
                f"error: {path} is not valid UTF-8 JSON ({type(e).__name__}: {e}). A .json input must hold one list of records; "
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
    """qwen-finetune / llava record → (messages with image parts named img{i}, video parts named
    vid{i} and, for Qwen-VL grounding, box parts in Qwen-VL units marked `_qwen_vl_box` (converted to
    pixels once the image sizes are known: `_boxes_to_pixels`), image paths, video paths)."""
    field_paths = _paths(data, "image")
    videos = _paths(data, "video")
    convs = data.get("conversations")
    if convs is None:
        raise Reject("empty_conversation", "no 'conversations' field")
    if not isinstance(convs, list):
        raise Reject("bad_record", "'conversations' must be a list of {from, value}")
    splitter = _QWEN_TAGS if fmt == "qwen-finetune" else _TAGS
    messages: list[dict] = []
    paths: list[Optional[str]] = []  # per image part in order; None = the next `image` field entry
    n_tags = n_video_tags = 0
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value", ""), str):
            raise Reject("bad_record", f"turn {k} must be {{'from': ..., 'value': str}}")
        role = ROLE_MAP.get(str(turn.get("from", "")).lower())
        if role is None:
            raise Reject("bad_record", f"turn {k} has unknown 'from'={turn.get('from')!r}; use human, gpt or system")
        value, reasoning = turn_reasoning(turn, role, k)
        parts: list[dict] = []
        pieces = splitter.split(value)  # text, tag, text, tag, ..., text
        n_media = 0
        for j, piece in enumerate(pieces):
            if j % 2 == 0:  # text between tags
                if piece:
                    parts.append({"type": "text", "text": piece})
            elif piece == IMAGE_TAG:
                parts.append({"type": "image", "name": f"img{len(paths)}"})  # extension added later
                paths.append(None)
                n_tags += 1
                n_media += 1
            elif piece == VIDEO_TAG:
                parts.append({"type": "video", "name": f"vid{n_video_tags}"})
                n_video_tags += 1
                n_media += 1
            elif piece.startswith("<img>"):
                path = _IMG_SPAN.fullmatch(piece).group(1).strip()
                if not path:
                    raise Reject("inline_image", f"turn {k}: an empty <img></img> span")
                parts.append({"type": "image", "name": f"img{len(paths)}"})
                paths.append(path)
                n_media += 1
            elif "<box>" in piece:
                parts.append(_qwen_vl_box(piece, len(paths), k))
            else:  # a <ref> without a <box>: its text stays (module docstring)
                parts.append({"type": "text", "text": piece[len("<ref>"):-len("</ref>")]})
        if role != "user" and n_media:
            raise Reject("bad_record",
                         f"turn {k} ({turn.get('from')}) holds an <image>/<video>/<img> tag; only human turns may")
        messages.append({"role": role, "content": parts})
        if reasoning is not None:
            messages[-1]["reasoning"] = reasoning
    if not messages or not any((p["type"] == "text" and p["text"].strip()) or p["type"] == "box"
                               for m in messages for p in m["content"]):
        raise Reject("empty_conversation", "no turns with text")
    if not any(m["role"] == "assistant" and (m["content"] or m.get("reasoning")) for m in messages):
        raise Reject("empty_conversation", "no assistant turn with text to train on")
    for tag, n, have, what in ((IMAGE_TAG, n_tags, len(field_paths), "images"),
                               (VIDEO_TAG, n_video_tags, len(videos), "videos")):
        if n != have:
            raise Reject("too_many_tags" if n > have else "too_few_tags", f"{n} {tag} tags, {have} {what}")
    field = iter(field_paths)
    return messages, [next(field) if p is None else p for p in paths], videos


def _qwen_vl_box(piece: str, n_images_before: int, k: int) -> dict:
    """`<ref>R</ref><box>(x1,y1),(x2,y2)</box>` (or a bare `<box>`) → a box part in Qwen-VL units on
    [0, 1000], referring to the latest image before it (converted to pixels by `_boxes_to_pixels`)."""
    m = _REF_BOX.fullmatch(piece)
    coords = _BOX_COORDS.fullmatch(m.group(2)) if m else None
    if coords is None:
        raise Reject("bad_box", f"turn {k}: {piece[:80]!r} is not <box>(x1,y1),(x2,y2)</box>")
    box = [int(v) for v in coords.groups()]
    if max(box) > 1000 or box[2] < box[0] or box[3] < box[1]:
        raise Reject("bad_box", f"turn {k}: {box} must lie on [0, 1000] with x1 <= x2 and y1 <= y2")
    if n_images_before == 0:
        raise Reject("bad_box", f"turn {k}: {piece[:80]!r} comes before any image (a box refers to the latest image)")
    return {"type": "box", "ref": m.group(1) or "", "box": box, "image": f"img{n_images_before - 1}",
            "_qwen_vl_box": True}


def _to_pixels(v: int, size: int) -> float:
    """Qwen-VL coordinate v = floor(x/size·1000) → the pixel x at the left edge of its bin, nudged up by
    float ulps where needed so that floor(x/size·1000) gives v back exactly."""
    x = v * size / 1000
    while v < 1000 and math.floor(x / size * 1000) < v:
        x = math.nextafter(x, math.inf)
    return x


def _boxes_to_pixels(messages: list[dict], sizes: dict[str, tuple[int, int]]) -> None:
    """Convert the Qwen-VL box parts (Qwen-VL units) in place to the shard's pixel coordinates of their
    image (`sizes`: image part name → (w, h))."""
    for m in messages:
        for part in m["content"]:
            if part.pop("_qwen_vl_box", False):
                w, h = sizes[part["image"]]
                x1, y1, x2, y2 = part["box"]
                part["box"] = [_to_pixels(x1, w), _to_pixels(y1, h), _to_pixels(x2, w), _to_pixels(y2, h)]


def check_no_inline_images(messages: list[dict]) -> None:
    """Reject (`inline_image`) a converted sample whose text still looks like an inline image reference."""
    for k, m in enumerate(messages):
        texts = [p.get("text", "") for p in m["content"] if p["type"] == "text"]
        texts += [p.get("ref", "") for p in m["content"] if p["type"] == "box"] + [m.get("reasoning") or ""]
        for text in texts:
            hit = _INLINE_IMAGE.search(str(text))
            if hit:
                raise Reject("inline_image", f"turn {k} ({m['role']}) text holds {hit.group(0)[:80]!r}; images must "
                             "be image members, not text (check the input format and its image tags)")


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
    """A record's media path → a file path: absolute paths as they are, relative ones under
    `media_root` and never outside it (`outside_root`); URLs are not fetched (`missing_file`)."""
    if _URL.match(path):
        raise Reject("missing_file", f"{path}: URLs are not fetched; download the file and give its path")
    if os.path.isabs(path):
        return path
    root = os.path.abspath(media_root)
    full = os.path.normpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise Reject("outside_root", f"{path} leaves --media-root {media_root}")
    return full


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


def load_video(path: str, max_frame_pixels: int = MAX_SOURCE_PIXELS,
               max_total_pixels: int = MAX_VIDEO_TOTAL_PIXELS) -> tuple[bytes, str]:
    """Read and check one video file → (encoded bytes, lower-case extension). The container metadata
    must be readable (frames, fps, size) and within the pixel caps (per frame and frames × pixels,
    checked before anything is decoded), and the first frame decodable; the rest is decoded at read time."""
    if not os.path.isfile(path):
        raise Reject("missing_file", path)
    with open(path, "rb") as f:
        blob = f.read()
    if not blob:
        raise Reject("unreadable_video", f"{path}: empty file (0 frames)")
    try:
        probe_video(blob, max_frame_pixels, max_total_pixels)
    except VideoTooLarge as e:
        raise Reject("video_pixel_limit", f"{path}: {e}") from e
    except BadVideo as e:
        raise Reject("unreadable_video", f"{path}: {e}") from e
    try:
        decode_frames(blob, [0])
    except BadVideo as e:
        raise Reject("unreadable_video", f"{path}: {e}") from e
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return blob, ext if re.fullmatch(r"[a-z0-9]{1,8}", ext) else "video"


def process_record(args: tuple[Record, str, str, int, int]) -> dict[str, Any]:
    """Worker: one record → {"ok": True, messages, images} or {"ok": False, reason, detail}."""
    rec, fmt, media_root, max_px, max_video_px = args
    try:
        if rec.data is None:
            raise Reject(rec.reason, rec.error)
        if fmt == "interleaved":
            messages, paths = convert_interleaved(rec.data)
            video_paths: list[str] = []
        else:
            messages, paths, video_paths = convert_conversations(rec.data, fmt)
        check_no_inline_images(messages)
        videos: dict[str, bytes] = {}
        names: dict[str, str] = {}
        for i, p in enumerate(video_paths):
            blob, ext = load_video(_resolve(media_root, p), min(max_px, MAX_VIDEO_FRAME_PIXELS), max_video_px)
            names[f"vid{i}"] = f"vid{i}.{ext}"
            videos[names[f"vid{i}"]] = blob
        images: dict[str, bytes] = {}
        sizes: dict[str, tuple[int, int]] = {}
        for i, p in enumerate(paths):
            blob, ext = load_image(_resolve(media_root, p), max_px)
            names[f"img{i}"] = f"img{i}.{ext}"
            images[names[f"img{i}"]] = blob
            sizes[f"img{i}"] = Image.open(io.BytesIO(blob)).size  # header only (validated above)
        _boxes_to_pixels(messages, sizes)
        try:
            json.dumps(messages, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:  # "\ud800" escapes parse into strings UTF-8 cannot hold
            raise Reject("bad_utf8", f"text with a lone surrogate: {e}") from e
        for m in messages:
            for part in m["content"]:
                if part["type"] in ("image", "video"):
                    part["name"] = names[part["name"]]
                elif part["type"] == "box":
                    part["image"] = names[part["image"]]
        return {"ok": True, "messages": messages, "images": images, "videos": videos}
    except Reject as e:
        return {"ok": False, "reason": e.reason, "detail": e.detail}
    except Exception as e:  # a bug or an input we did not foresee: still reported, never silent
        return {"ok": False, "reason": "bad_record", "detail": f"{type(e).__name__}: {e}"}


def _results(records: list[Record], fmt: str, media_root: str, max_px: int, workers: int) -> Iterator[dict]:
    jobs = ((r, fmt, media_root, max_px, MAX_VIDEO_TOTAL_PIXELS) for r in records)
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
def prepare_out_dir(out_dir: str, overwrite: bool) -> list[str]:
    """Refuse an `out_dir` that already holds this tool's output (shards, index, report) unless
    `overwrite`, which removes exactly those files (never anything else); returns the removed names."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise SystemExit(f"error: --out {out_dir} exists and is not a directory")
        return []
    ours = sorted(n for n in os.listdir(out_dir) if OUTPUT_FILES.fullmatch(n)
                  and os.path.isfile(os.path.join(out_dir, n)))
    if ours and not overwrite:
        shown = ", ".join(ours[:4]) + (f" and {len(ours) - 4} more" if len(ours) > 4 else "")
        raise SystemExit(
            f"error: --out {out_dir} already holds shards or an index ({shown}); new shards beside them would "
            "be mixed with the old ones. Pass --overwrite to remove them first (only shard-*.tar, index.json "
            "and report.json are removed), or choose another --out."
        )
    for name in ours:
        os.remove(os.path.join(out_dir, name))
    return ours


def make_shards(
    fmt: str, input_path: str, media_root: Optional[str], out_dir: str, *, samples_per_shard: int = 1000, workers: int = 1,
    max_source_pixels: int = MAX_SOURCE_PIXELS, progress: bool = True, overwrite: bool = False,
    tokenizer: Optional[str] = None,
) -> dict[str, Any]:
    """Convert `input_path` into shards in `out_dir`; returns the report (also written to report.json).
    An `out_dir` that already holds shards is refused unless `overwrite` (`prepare_out_dir`). `tokenizer`: the
    `data.tokenizer` directory of the runs that will read the shards (the index's text-token counts use it)."""
    if fmt not in FORMATS:
        raise SystemExit(f"error: --format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if media_root is None:  # paths relative to the input file, as Qwen-VL's finetune.py reads them from its cwd
        media_root = os.path.dirname(os.path.abspath(input_path))
    if not os.path.isdir(media_root):
        raise SystemExit(f"error: --media-root {media_root} is not a directory; pass the folder image paths are relative to")
    if samples_per_shard < 1 or workers < 1:
        raise SystemExit("error: --samples-per-shard and --workers must be >= 1")
    try:
        tok = get_tokenizer(tokenizer)
    except ValueError as e:
        raise SystemExit(f"error: --tokenizer: {e}") from None
    t0 = time.perf_counter()
    records, total = read_records(input_path)
    removed = prepare_out_dir(out_dir, overwrite)
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    os.makedirs(out_dir, exist_ok=True)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="sample", desc="make_shards", disable=not progress, file=sys.stderr)
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard, tokenizer=tok) as writer:
        for rec, res in zip(records, _results(records, fmt, media_root, max_source_pixels, workers)):
            bar.update(1)
            if res["ok"] and rec.sample_id in seen:
                res = {"ok": False, "reason": "duplicate_id", "detail": rec.sample_id}
            if not res["ok"]:
                rejected.append({"record": rec.label, "reason": res["reason"], "message": REASONS[res["reason"]],
                                 "detail": res["detail"]})
                continue
            try:  # the writer validates before it writes (an unforeseen error still becomes a rejection)
                writer.add(rec.sample_id, res["messages"], res["images"], res["videos"])
            except Exception as e:
                rejected.append({"record": rec.label, "reason": "bad_record", "message": REASONS["bad_record"],
                                 "detail": f"{type(e).__name__}: {e}"[:500]})
                continue
            seen.add(rec.sample_id)
        bar.close()
    counts: dict[str, int] = {}
    for r in rejected:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    report = {
        "format": fmt, "input": os.path.abspath(input_path), "media_root": os.path.abspath(media_root),
        "out": os.path.abspath(out_dir), "records": total, "written": writer.num_samples,
        "rejected": len(rejected), "rejected_by_reason": dict(sorted(counts.items())),
        "shards": writer.shard_names, "removed_before": removed, "seconds": round(time.perf_counter() - t0, 2),
        "rejections": rejected,
    }
    tmp = os.path.join(out_dir, ".report.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    os.replace(tmp, os.path.join(out_dir, "report.json"))
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"removed {len(report['removed_before'])} files of an earlier run from {report['out']} (--overwrite)"
             ] if report.get("removed_before") else []
    lines += [
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
    ap.add_argument("--media-root", default=None,
                    help="directory that image/video paths are relative to (default: the --input file's folder)")
    ap.add_argument("--out", required=True, help="output shard directory (created)")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1, help="processes that read and validate media")
    ap.add_argument("--max-source-pixels", type=int, default=MAX_SOURCE_PIXELS,
                    help="reject images whose header claims more pixels (decompression bomb guard)")
    ap.add_argument("--overwrite", action="store_true",
                    help="--out may hold shards of an earlier run: remove its shard-*.tar, index.json and "
                         "report.json first (nothing else)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--tokenizer", default=None,
                    help="directory with tokenizer.json: the data.tokenizer of the training run (default: bundled Qwen BPE)")
    args = ap.parse_args(argv)
    report = make_shards(
        args.format, args.input, args.media_root, args.out, samples_per_shard=args.samples_per_shard,
        workers=args.workers, max_source_pixels=args.max_source_pixels, progress=not args.no_progress,
        overwrite=args.overwrite, tokenizer=args.tokenizer,
    )
    print("\n".join(summary_lines(report)))
    if report["written"] == 0:
        print("error: no record could be converted; fix the reasons above (see report.json) and rerun", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
