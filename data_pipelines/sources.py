"""Where a data source's shards and its index live: local directories, brace patterns, URLs.

A `DataSource.path` is one of

* a local shard directory (`data/synth`): shards `DIR/<name>` for every shard named in
  `DIR/index.json`;
* a brace pattern or a single `.tar` (`data/synth/shard-{000000..000002}.tar`, also over URLs):
  exactly the shards it expands to, in that order; the index is `index.json` next to the first
  shard (the shard's file name replaced by `index.json`), restricted to those shards;
* a URL that webdataset opens (`http(s)://`, `gs://`, `file://`, ... a "directory" URL): shards
  `URL/<name>`, index `URL/index.json`;
* a template with `{shard}` where the shard's file name goes, for any command or URL, e.g.
  `pipe:aws s3 cp s3://bucket/data/{shard} -` (object storage through a command): the index is
  the same template with `index.json` in place of `{shard}`, fetched through the same command.

Shard names come from the index, which is untrusted: every name must be a plain `*.tar` file name
(`shards.check_shard_name`, checked when the index is read, before anything is opened) and is
substituted shell-quoted into a `pipe:` command.

`DataSource.index` overrides where the index comes from (a local path or any URL above, `pipe:`
included). Every rank fetches the small index once at start; the plan never opens a shard, so a
remote source costs nothing until its samples are read. `s3://bucket/prefix` (shards and index) is
read through boto3, by byte range when the index has offsets (data_pipelines/ranged.py).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from typing import Any, Optional

import braceexpand
from webdataset.gopen import gopen

from data_pipelines.schema import SHARD_FIELD, SHARD_NAME, check_source_path, is_url
from data_pipelines.shards import INDEX_NAME, check_shard_name, read_index, validate_index


@dataclass(frozen=True)
class ResolvedSource:
    """One source, resolved: its index (only the shards it names) and the URL of each of them."""

    path: str
    """`DataSource.path` as configured."""
    index_url: str
    """Where the index was read from."""
    index: dict[str, Any]
    """The validated index, `shards` restricted (and ordered) to this source's shards."""
    shard_urls: tuple[str, ...]
    """What webdataset opens for `index["shards"][i]`."""


def fetch_bytes(url: str) -> bytes:
    """Read a whole local file or URL (http(s), pipe:, ... through webdataset's `gopen`; s3:// through boto3)."""
    if url.startswith("s3://"):
        from data_pipelines.ranged import read_s3_object

        return read_s3_object(url)
    with gopen(url, "rb") as f:
        return f.read()


def load_index(url: str) -> dict[str, Any]:
    """Fetch and validate an index.json from a local path or any URL webdataset opens."""
    if not is_url(url):
        if os.path.isdir(url):
            return read_index(url)
        if not os.path.isfile(url):
            raise FileNotFoundError(f"{url} not found: a data source needs its index.json (see docs/data.md)")
    try:
        index = json.loads(fetch_bytes(url).decode("utf-8"))
    except Exception as e:
        raise ValueError(f"could not read the shard index {url}: {type(e).__name__}: {e}") from e
    return validate_index(index, url)


def shard_url(template: str, name: str) -> str:
    """`template` with `{shard}` replaced by the index's shard `name`, checked (`check_shard_name`) and,
    in a `pipe:` command, shell-quoted, so text from an index never becomes shell syntax."""
    check_shard_name(name, template)
    return template.replace(SHARD_FIELD, shlex.quote(name) if template.startswith("pipe:") else name)


def _local(path: str, root: str) -> str:
    return path if is_url(path) or os.path.isabs(path) else os.path.join(root, path)


def shard_list(path: str) -> Optional[list[str]]:
    """The shard URLs a brace pattern / single `.tar` names, else None (a directory or template)."""
    if SHARD_FIELD in path:
        return None
    urls = list(braceexpand.braceexpand(path))
    if len(urls) > 1 or SHARD_NAME.search(path.rstrip("/").rsplit("/", 1)[-1]) or path.startswith("pipe:"):
        return urls
    return None


def _name_in(url: str) -> tuple[int, int]:
    """Span of the shard's file name in a shard URL (the last `*.tar` token)."""
    found = list(SHARD_NAME.finditer(url))
    if not found:
        raise ValueError(f"data source shard {url!r} names no '*.tar' file; the shard names must end in .tar")
    return found[-1].span()


def resolve_source(path: str, index: Optional[str] = None, root: str = ".") -> ResolvedSource:
    """Resolve one source (see the module docstring); relative local paths are taken from `root`."""
    check_source_path(path)
    full = _local(path, root)
    listed = shard_list(full)
    if listed is not None:
        names, dirs = [], set()
        for url in listed:
            a, b = _name_in(url)
            names.append(url[a:b])
            dirs.add(url[:a] + SHARD_FIELD + url[b:])
        if len(dirs) > 1 and index is None:
            raise ValueError(
                f"data source {path!r} names shards that do not share one index.json ({len(dirs)} locations); "
                "use one source per shard directory, or give the source an 'index'"
            )
        template = sorted(dirs)[0]
        index_url = _local(index, root) if index else template.replace(SHARD_FIELD, INDEX_NAME)
        return _restrict(path, index_url, load_index(index_url), names, listed)
    if SHARD_FIELD in full:
        template = full
    elif is_url(full):
        template = full.rstrip("/") + "/" + SHARD_FIELD
    else:
        template = os.path.join(full, SHARD_FIELD)
    index_url = _local(index, root) if index else template.replace(SHARD_FIELD, INDEX_NAME)
    idx = load_index(index_url)
    urls = tuple(shard_url(template, sh["name"]) for sh in idx["shards"])
    return ResolvedSource(path=path, index_url=index_url, index=idx, shard_urls=urls)


def _restrict(path: str, index_url: str, idx: dict[str, Any], names: list[str], urls: list[str]) -> ResolvedSource:
    by_name = {sh["name"]: sh for sh in idx["shards"]}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"data source {path!r}: shards {missing[:5]} are not in its index {index_url}; "
            "check the pattern (or the source's 'index')"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"data source {path!r} names a shard twice")
    return ResolvedSource(
        path=path, index_url=index_url, index={**idx, "shards": [by_name[n] for n in names]}, shard_urls=tuple(urls)
    )
