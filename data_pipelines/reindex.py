"""Record each sample's member offsets in a shard directory's index.json:  python -m data_pipelines.reindex DIR

For shards written by other tools (plain WebDataset tars, an older `make_shards`) so that the loader
reads exactly each sample's bytes instead of streaming whole shards (data_pipelines/ranged.py).

* `DIR/index.json` exists: every shard it names is scanned (tar headers only: the data is skipped by
  seeking) and each sample entry gains `offset` (its first tar header) and `members` ({ext:
  [data_offset, size]}); each shard gains `size`. Every other field is kept. A sample the index names
  but its tar lacks, or a shard that cannot be read, stops the tool with its name: nothing is written.
* no index: every `*.tar` in DIR (sorted by name) is read once and each sample — a `K.json` in the
  format of data_pipelines/shards.py plus the images/videos it names — is validated and indexed
  (token counts from the chat templates, image sizes from their headers, video metadata); samples that
  fail are left out and counted by reason in the printed report.

The index is written atomically (temporary file, then rename). Nothing read is executed or
unpickled: member names are split into key and extension, JSON is parsed, images are opened for
their header only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
from collections import Counter
from typing import Any, Optional

from data_pipelines.ranged import sample_members
from data_pipelines.shards import INDEX_NAME, read_index, write_index

SAFE_SHARD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.tar$")


class ReindexError(Exception):
    """A shard or index that cannot be indexed; the message names it."""


def scan_offsets(path: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """One tar's size and, per sample key, `{"offset": first header, "members": {ext: [data_offset, size]}}`
    from its headers (members of one key must be consecutive, as WebDataset reads them)."""
    out: dict[str, dict[str, Any]] = {}
    last: Optional[str] = None
    try:
        with tarfile.open(path, "r:") as tar:
            for info, key, ext in sample_members(tar):
                if key in out and key != last:
                    raise ReindexError(f"{path}: the members of sample {key!r} are not consecutive (member {info.name!r})")
                entry = out.setdefault(key, {"offset": info.offset, "members": {}})
                if ext in entry["members"]:
                    raise ReindexError(f"{path}: sample {key!r} has two {ext!r} members")
                entry["members"][ext] = [info.offset_data, info.size]
                last = key
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ReindexError(f"{path}: not a readable tar ({type(e).__name__}: {e})") from e
    size = os.path.getsize(path)
    for key, entry in out.items():
        for ext, (off, n) in entry["members"].items():
            if off + n > size:
                raise ReindexError(f"{path}: member {key}.{ext} runs past the end of the file (truncated shard)")
    return size, out


def update_index(src: str) -> dict[str, int]:
    """Add offsets to `src/index.json` (see the module docstring); returns counts for the report."""
    index = read_index(src)
    samples = 0
    for sh in index["shards"]:
        name = sh["name"]
        if not SAFE_SHARD.match(name):
            raise ReindexError(f"{src}/{INDEX_NAME}: shard name {name!r} is not a plain *.tar file name")
        size, found = scan_offsets(os.path.join(src, name))
        missing = [s["key"] for s in sh["samples"] if s["key"] not in found]
        if missing:
            raise ReindexError(f"{name}: the index names samples its tar lacks: {missing[:5]} ({len(missing)} in all); "
                               "the index does not belong to this shard")
        sh["size"] = size
        for s in sh["samples"]:
            s["offset"], s["members"] = found[s["key"]]["offset"], found[s["key"]]["members"]
        samples += len(sh["samples"])
    write_index(src, index["shards"])
    read_index(src)  # what was written validates
    return {"shards": len(index["shards"]), "samples": samples}


def build_index(src: str) -> dict[str, Any]:
    """Index every `*.tar` in `src` from its contents (no index.json yet); see the module docstring."""
    from data_pipelines.shards import ShardWriter, index_entry
    from data_pipelines.text import get_tokenizer, message_parts

    names = sorted(n for n in os.listdir(src) if n.endswith(".tar"))
    unsafe = [n for n in names if not SAFE_SHARD.match(n)]
    if unsafe:
        raise ReindexError(f"{src}: shard file names must be plain names like shard-000000.tar: {unsafe[:5]}")
    if not names:
        raise ReindexError(f"{src}: no *.tar shards to index")
    tok, rejected, shards = get_tokenizer(), Counter(), []
    for name in names:
        path = os.path.join(src, name)
        size, spans = scan_offsets(path)
        blobs = _read_members(path)
        entries = []
        for key, span in spans.items():
            try:
                entry = _describe(key, blobs.get(key, {}), tok, message_parts, index_entry, ShardWriter._videos)
            except _Reject as e:
                rejected[e.reason] += 1
                continue
            entry["offset"], entry["members"] = span["offset"], span["members"]
            entries.append(entry)
        shards.append({"name": name, "size": size, "samples": entries})
    write_index(src, shards)
    read_index(src)
    return {"shards": len(shards), "samples": sum(len(s["samples"]) for s in shards), "rejected": dict(rejected)}


class _Reject(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _read_members(path: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:") as tar:
        for info, key, ext in sample_members(tar):
            f = tar.extractfile(info)
            out.setdefault(key, {})[ext] = f.read() if f is not None else b""
    return out


def _describe(key, members, tok, message_parts, index_entry, probe_videos) -> dict[str, Any]:
    """The planning fields of one sample from its members (raises _Reject with a reason)."""
    from PIL import Image

    try:
        doc = json.loads(members["json"].decode("utf-8"))
        messages, sample_id = doc["messages"], str(doc["id"])
        parts = [p for m in messages for p in message_parts(m)]
    except KeyError as e:
        raise _Reject("missing_member" if e.args == ("json",) else "bad_json") from e
    except Exception as e:
        raise _Reject("bad_json") from e
    sizes = []
    for p in (p for p in parts if p.get("type") == "image"):
        blob = members.get(str(p.get("name", "")).lower())
        if blob is None:
            raise _Reject("missing_member")
        try:
            with Image.open(io.BytesIO(blob)) as im:
                w, h = im.size
        except Exception as e:
            raise _Reject("bad_image") from e
        sizes.append([h, w])
    videos = {str(p.get("name", "")).lower(): members.get(str(p.get("name", "")).lower())
              for p in parts if p.get("type") == "video"}
    if any(v is None for v in videos.values()):
        raise _Reject("missing_member")
    try:
        counts = tok.text_token_counts(messages)
        video_rows = probe_videos(sample_id, messages, videos) if videos else {}
    except Exception as e:
        raise _Reject("bad_video" if videos else "bad_json") from e
    entry = index_entry(sample_id, key, counts, sizes)
    if video_rows:
        entry["videos"] = list(video_rows.values())
    return entry


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipelines.reindex", description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="shard directory (its index.json is updated, or built when there is none)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"reindex: {args.dir} is not a directory", file=sys.stderr)
        return 2
    try:
        if os.path.exists(os.path.join(args.dir, INDEX_NAME)):
            report = update_index(args.dir)
            how = "offsets added to the existing index"
        else:
            report = build_index(args.dir)
            how = "index built from the shards"
    except (ReindexError, ValueError) as e:
        print(f"reindex: {e}", file=sys.stderr)
        return 1
    print(f"{os.path.join(args.dir, INDEX_NAME)}: {how}; " + ", ".join(f"{k} {v}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
