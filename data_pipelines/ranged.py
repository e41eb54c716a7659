"""Exact-byte reads of shard members: local `seek`, HTTP `Range`, ranged S3 GETs, streaming as the fallback.

Why
---
A rank needs a handful of samples from a shard per step. Streaming the tar from its start up to the
last needed sample moves most of the shard on every step that touches it and on every rank (I/O
amplification of one to two orders of magnitude at 64+ data-parallel ranks). When the index records
where each member's bytes are (`members: {ext: [data_offset, size]}`, written by `ShardWriter`,
`make_shards`, the synth factory and `python -m data_pipelines.reindex DIR`), the reader fetches
exactly those bytes:

* local paths and `file://` URLs: `os.pread` (a seek and a read);
* `http(s)://`: `Range: bytes=a-b` GETs on one keep-alive session per thread (a server that answers
  200 instead of 206 is read by streaming from then on, with a warning);
* `s3://bucket/key`: ranged `GetObject` through boto3; the endpoint comes from the standard
  environment (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, credentials and region as boto3 finds them);
* anything else (`pipe:` commands, `gs://`, ...), and every shard of an index without offsets, is
  streamed through webdataset's `gopen` as before; a `pipe:` source warns once what that costs.
  With `data.cache_dir` such shards are downloaded once per node into a bounded LRU cache
  (`ShardCache`) and then read by offset from the local copy.

Adjacent members of one rank's samples in one shard coalesce into one request when the bytes in
between (tar headers, padding, other samples) stay under `MAX_WASTE` of the bytes used, so the bytes
read stay within a few percent of the bytes used at any dp size. Every read counts what it moved
(`IOStats.bytes_read`) and what the samples hold (`bytes_used`); the loader reports both per step.

A shard whose size differs from the size the index recorded is stale: it is streamed (keys, not
offsets, find the samples) and logged once, so a rewritten shard never yields the wrong bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

TAR_BLOCK = 512
MAX_WASTE = 0.03
"""Coalesce two requests when the bytes between them keep a request's unused bytes under this share of
its used bytes (the tar headers of the members in between are the usual gap)."""
MAX_GAP = 4 << 20
"""Never bridge more than this many bytes between two ranges, whatever the share."""
REMOTE_THREADS = 8
"""Concurrent range requests per rank for http(s) and s3 sources."""

_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_warned: set[str] = set()
_warn_lock = threading.Lock()


def split_member(name: str) -> tuple[Optional[str], Optional[str]]:
    """A tar member name → (sample key, extension) as WebDataset groups them: the key runs to the first
    dot of the file name (directory kept), the extension (lower-cased) is the rest; (None, None) if the
    name has no dot."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def warn_once(tag: str, message: str, *args: Any) -> None:
    with _warn_lock:
        if tag in _warned:
            return
        _warned.add(tag)
    log.warning(message, *args)


@dataclass
class IOStats:
    """Bytes moved by the reader. `bytes_read`: pulled from the shard source (network, object store,
    pipe, local file), including whole shards downloaded into the cache; `bytes_used`: the member bytes
    of the samples returned; `bytes_cached`: read out of the node-local cache; `requests`: range
    requests or streams opened."""

    bytes_read: int = 0
    bytes_used: int = 0
    bytes_cached: int = 0
    requests: int = 0

    def add(self, other: "IOStats") -> None:
        self.bytes_read += other.bytes_read
        self.bytes_used += other.bytes_used
        self.bytes_cached += other.bytes_cached
        self.requests += other.requests


class NotRangeable(Exception):
    """The source cannot serve byte ranges (or its size contradicts the index): stream it instead."""


# ----------------------------------------------------------------------------------------- planning
def coalesce(spans: list[tuple[int, int]], *, max_waste: float = MAX_WASTE, max_gap: int = MAX_GAP) -> list[tuple[int, int, list[int]]]:
    """Group byte spans `(offset, size)` into requests `(start, end, [span indices])`, sorted by offset.

    A span joins the request before it when the gap is at most `max_gap` and the request's unused
    bytes stay at most `max_waste` times its used bytes, so `sum(end - start) <= (1 + max_waste) *
    sum(sizes)` for any input (overlapping or repeated spans are read once)."""
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    out: list[tuple[int, int, list[int]]] = []
    used = waste = 0
    for i in order:
        off, size = spans[i]
        if out:
            start, end, members = out[-1]
            gap = off - end
            if gap <= 0:  # overlaps the request: nothing to add but what reaches past its end
                new_end = max(end, off + size)
                used += new_end - end
                out[-1] = (start, new_end, members + [i])
                continue
            if gap <= max_gap and waste + gap <= max_waste * (used + size):
                waste += gap
                used += size
                out[-1] = (start, off + size, members + [i])
                continue
        out.append((off, off + size, [i]))
        used, waste = size, 0
    return out


# ----------------------------------------------------------------------------------- range readers
def source_kind(url: str) -> str:
    """`local`, `http`, `s3` (readable by range) or `stream` (pipe: and other gopen schemes)."""
    if url.startswith("pipe:"):
        return "stream"
    scheme = urlparse(url).scheme
    if len(scheme) <= 1 or scheme == "file":
        return "local"
    if scheme in ("http", "https"):
        return "http"
    if scheme == "s3":
        return "s3"
    return "stream"


def _local_path(url: str) -> str:
    return unquote(urlparse(url).path) if url.startswith("file:") else url


def _pread_all(fd: int, start: int, end: int) -> bytes:
    chunks, pos = [], start
    while pos < end:
        got = os.pread(fd, end - pos, pos)
        if not got:
            raise EOFError(f"the file ends at byte {pos}, before {end}")
        chunks.append(got)
        pos += len(got)
    return b"".join(chunks)


_http_local = threading.local()


class _Http:
    def __init__(self, url: str):
        self.url = url

    @staticmethod
    def _session():
        import requests

        s = getattr(_http_local, "session", None)
        if s is None:
            s = _http_local.session = requests.Session()
        return s

    def fetch(self, start: int, end: int) -> tuple[bytes, Optional[int]]:
        r = self._session().get(self.url, headers={"Range": f"bytes={start}-{end - 1}"}, timeout=60, stream=True)
        try:
            if r.status_code == 200:
                raise NotRangeable(f"{self.url}: the server ignores Range requests (HTTP 200 for a range)")
            if r.status_code != 206:
                raise OSError(f"{self.url}: HTTP {r.status_code} for bytes {start}-{end - 1}")
            got = r.headers.get("Content-Range", "")
            if not got.strip().startswith(f"bytes {start}-"):
                raise OSError(f"{self.url}: asked for bytes {start}-{end - 1}, the server sent Content-Range {got!r}")
            body = r.raw.read(end - start + 1, decode_content=False)
            total = _total_from_content_range(got)
        finally:
            r.close()
        if len(body) != end - start:
            raise EOFError(f"{self.url}: got {len(body)} bytes for the range {start}-{end - 1}")
        return body, total


def _total_from_content_range(value: str) -> Optional[int]:
    m = re.match(r"^bytes \d+-\d+/(\d+)$", value.strip())
    return int(m.group(1)) if m else None


_s3_lock = threading.Lock()
_s3_clients: dict[int, Any] = {}


def s3_client():
    """One boto3 S3 client per process (clients are thread-safe); endpoint, region and credentials
    from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`, `AWS_*`)."""
    with _s3_lock:
        client = _s3_clients.get(os.getpid())
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as e:  # pragma: no cover - boto3 is in the test extra
                raise RuntimeError("s3:// data sources need boto3: pip install boto3") from e
            client = boto3.session.Session().client(
                "s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
                config=Config(max_pool_connections=max(10, REMOTE_THREADS * 2), retries={"max_attempts": 5}),
            )
            _s3_clients[os.getpid()] = client
        return client


def parse_s3(url: str) -> tuple[str, str]:
    p = urlparse(url)
    if not p.netloc or not p.path.strip("/"):
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return p.netloc, unquote(p.path.lstrip("/"))


class _S3:
    def __init__(self, url: str):
        self.url = url
        self.bucket, self.key = parse_s3(url)

    def fetch(self, start: int, end: int) -> tuple[bytes, Optional[int]]:
        r = s3_client().get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}")
        body = r["Body"].read()
        if len(body) != end - start:
            raise EOFError(f"{self.url}: got {len(body)} bytes for the range {start}-{end - 1}")
        return body, _total_from_content_range(r.get("ContentRange", ""))


def read_s3_object(url: str) -> bytes:
    """A whole s3:// object (the index of an s3 source)."""
    bucket, key = parse_s3(url)
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


# --------------------------------------------------------------------------------------- streaming
class _Counting:
    """A read-only file object that counts the bytes read through it."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.n += len(b)
        return b


def sample_members(tar: tarfile.TarFile) -> Iterable[tuple[tarfile.TarInfo, str, str]]:
    """(member, sample key, extension) of every regular file of a tar that belongs to a sample
    (WebDataset's `__meta__`-style names and dot-less names are not samples)."""
    for info in tar:
        if not info.isreg():
            continue
        key, ext = split_member(info.name)
        if key is not None and not os.path.basename(info.name).startswith("__"):
            yield info, key, ext


def stream_members(fileobj, keys: set[str], stats: IOStats, found: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
    """Read a tar stream from its start until every key in `keys` is complete, into `found` ({key:
    {ext: bytes}}, also returned).

    Members are grouped as WebDataset groups them (consecutive members with the same key); a key
    whose members are split by another key keeps its first group. Raises on a damaged tar; `found`
    then holds what was read before the damage."""
    counted = _Counting(fileobj)
    current: Optional[str] = None
    try:
        with tarfile.open(fileobj=counted, mode="r|*") as tar:
            for info, key, ext in sample_members(tar):
                if key != current:
                    if len(found) == len(keys):  # every wanted sample's group is complete
                        break
                    current = key
                if key not in keys or ext in found.get(key, {}):
                    continue
                f = tar.extractfile(info)
                found.setdefault(key, {})[ext] = f.read() if f is not None else b""
    finally:
        stats.bytes_read += counted.n
        stats.requests += 1
    return found


def stream_shard(url: str, keys: set[str], stats: IOStats, found: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
    """Stream one shard (any source) from its start until the samples `keys` are read into `found`."""
    kind = source_kind(url)
    if kind == "s3":
        bucket, key = parse_s3(url)
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return stream_members(body, keys, stats, found)
        finally:
            body.close()
    from webdataset.gopen import gopen

    with gopen(_local_path(url) if kind == "local" else url, "rb") as f:
        return stream_members(f, keys, stats, found)


# ------------------------------------------------------------------------------------- the cache
class ShardCache:
    """A node-local copy of streamed shards under `root`, at most `max_bytes` in all (least recently
    used evicted first). Ranks of one node share it: one process downloads a shard (an `flock` on its
    lock file; the others wait), to a temporary name renamed into place, so no reader ever sees a
    partial shard; a reader opens its copy before any eviction can remove it (Linux keeps an open
    file's data). Files are named by a hash of the shard URL."""

    def __init__(self, root: str, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"data cache size must be > 0 bytes, got {max_bytes}")
        self.root, self.max_bytes = root, int(max_bytes)
        os.makedirs(root, exist_ok=True)

    def path_for(self, url: str) -> str:
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]
        return os.path.join(self.root, f"{digest}.tar")

    def open(self, url: str, download: Callable[[Any], None], stats: IOStats) -> int:
        """An open file descriptor of the cached copy of `url`, downloading it first with
        `download(file)` (which writes the whole shard) if no copy exists."""
        path = self.path_for(url)
        with open(path + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    fd = os.open(path, os.O_RDONLY)
                    os.utime(path)  # recently used
                    return fd
                except FileNotFoundError:
                    pass
                tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
                try:
                    with open(tmp, "wb") as f:
                        download(f)
                    stats.bytes_read += os.path.getsize(tmp)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                fd = os.open(path, os.O_RDONLY)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.evict(keep=path)
        return fd

    def evict(self, keep: Optional[str] = None) -> None:
        """Remove least recently used copies until the cache fits `max_bytes` (never `keep`)."""
        entries = []
        for name in os.listdir(self.root):
            if name.endswith(".tar"):
                p = os.path.join(self.root, name)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(e[1] for e in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            try:
                os.remove(p)
                total -= size
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------------------- the reader
@dataclass
class ShardRequest:
    """The samples one rank needs from one shard: `keys`, and where each member is when the index
    says so (`members[key] = {ext: (data_offset, size)}`, None for a sample without offsets)."""

    url: str
    keys: list[str]
    members: dict[str, Optional[dict[str, tuple[int, int]]]]
    shard_size: Optional[int] = None
    name: str = ""


class ShardReader:
    """Reads `ShardRequest`s by range where the source and the index allow it, else by streaming
    (through `cache` when given and the source is not a local file); see the module docstring."""

    def __init__(self, cache: Optional[ShardCache] = None, threads: int = REMOTE_THREADS):
        self.cache = cache
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-read") if threads > 1 else None
        self._fetch = ThreadPoolExecutor(threads, thread_name_prefix="shard-range") if threads > 1 else None
        self._not_rangeable: set[str] = set()  # hosts/urls found unable to serve ranges

    def close(self) -> None:
        for pool in (self._pool, self._fetch):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._fetch = None

    def read_many(self, requests: Iterable[ShardRequest]) -> list[tuple[dict[str, dict[str, bytes]], Optional[str], IOStats]]:
        """Read several shards' requests (remote range requests run concurrently); per request:
        ({key: {ext: bytes}}, error string or None, its IOStats)."""
        requests = list(requests)
        if self._pool is None or len(requests) < 2:
            return [self.read(r) for r in requests]
        return list(self._pool.map(self.read, requests))

    def read(self, req: ShardRequest) -> tuple[dict[str, dict[str, bytes]], Optional[str], IOStats]:
        stats = IOStats()
        kind = source_kind(req.url)
        ranged = kind in ("local", "http", "s3") and req.url not in self._not_rangeable
        offsets = all(req.members.get(k) for k in req.keys)
        found: dict[str, dict[str, bytes]] = {}
        err = None
        try:
            if ranged and offsets:
                try:
                    err = self._read_ranges(kind, req, stats, found)
                except NotRangeable as e:
                    self._not_rangeable.add(req.url)
                    warn_once(f"norange:{req.url}", "data: %s; reading it by streaming from now on", e)
                    stream_shard(req.url, set(req.keys), stats, found)
            elif self.cache is not None and kind != "local":
                self._cached(req, stats, offsets, found)
            else:
                if kind == "stream" and req.url.startswith("pipe:"):
                    warn_once("pipe", "data: pipe: sources are streamed from each shard's start up to the last sample a "
                              "rank needs, so every rank reads most of every shard it touches (bytes read many times "
                              "the bytes used: see data/bytes_read vs data/bytes_used). Serve the shards over "
                              "http(s):// or s3:// with offsets in the index, or set data.cache_dir to download each "
                              "shard once per node")
                elif not offsets and kind != "stream":
                    warn_once(f"nooffsets:{os.path.dirname(req.url)}", "data: the index of %s has no member offsets, so "
                              "its shards are streamed; `python -m data_pipelines.reindex DIR` adds them",
                              os.path.dirname(req.url) or req.url)
                stream_shard(req.url, set(req.keys), stats, found)
        except Exception as e:  # OSError, tarfile.ReadError, botocore errors, ... — keep what we have
            err = f"{type(e).__name__}: {e}"
        stats.bytes_used += sum(len(v) for members in found.values() for v in members.values())
        return found, err, stats

    # ----------------------------------------------------------------------------- internals
    def _read_ranges(self, kind: str, req: ShardRequest, stats: IOStats, found: dict[str, dict[str, bytes]]) -> Optional[str]:
        """Read the requested members into `found`; a request that fails loses only its own members
        (returns the first failure as the shard's error). NotRangeable propagates: stream instead."""
        spans, where = [], []
        for key in req.keys:
            for ext, (off, size) in req.members[key].items():
                spans.append((int(off), int(size)))
                where.append((key, ext))
        groups = coalesce(spans)
        if kind == "local":
            fd = os.open(_local_path(req.url), os.O_RDONLY)
            try:
                self._check_size(req, os.fstat(fd).st_size)
                fetched = [_attempt(lambda a=a, b=b: (_pread_all(fd, a, b), None)) for a, b, _ in groups]
            finally:
                os.close(fd)
        else:
            src = _Http(req.url) if kind == "http" else _S3(req.url)
            if self._fetch is not None and len(groups) > 1:  # the requests of one shard in flight together
                fetched = list(self._fetch.map(lambda g: _attempt(lambda: src.fetch(g[0], g[1])), groups))
            else:
                fetched = [_attempt(lambda a=a, b=b: src.fetch(a, b)) for a, b, _ in groups]
            for t in {r[1] for r in fetched if isinstance(r, tuple) and r[1] is not None}:
                self._check_size(req, t)
        stats.requests += len(groups)
        ok = [(g, r[0]) for g, r in zip(groups, fetched) if isinstance(r, tuple)]
        stats.bytes_read += sum(len(blob) for _, blob in ok)
        got = _slice([g for g, _ in ok], [blob for _, blob in ok], spans, where)
        found.update({key: members for key, members in got.items() if len(members) == len(req.members[key])})
        failed = [r for r in fetched if isinstance(r, Exception)]
        return f"{type(failed[0]).__name__}: {failed[0]} ({len(failed)} of {len(groups)} requests failed)" if failed else None

    @staticmethod
    def _check_size(req: ShardRequest, size: int) -> None:
        if req.shard_size is not None and size != req.shard_size:
            warn_once(f"stale:{req.url}", "data: shard %s is %d bytes, its index says %d: the index is stale "
                      "(rerun python -m data_pipelines.reindex); streaming the shard instead", req.url, size, req.shard_size)
            raise NotRangeable(f"{req.url}: size {size} differs from the index's {req.shard_size}")

    def _cached(self, req: ShardRequest, stats: IOStats, offsets: bool, found: dict[str, dict[str, bytes]]) -> None:
        kind = source_kind(req.url)

        def download(out) -> None:
            if kind == "s3":
                bucket, key = parse_s3(req.url)
                s3_client().download_fileobj(bucket, key, out)
                return
            from webdataset.gopen import gopen

            with gopen(req.url, "rb") as f:
                while chunk := f.read(1 << 20):
                    out.write(chunk)

        fd = self.cache.open(req.url, download, stats)
        local = IOStats()
        try:
            if offsets:
                spans = [(int(o), int(s)) for k in req.keys for o, s in req.members[k].values()]
                where = [(k, e) for k in req.keys for e in req.members[k]]
                groups = coalesce(spans)
                blobs = [_pread_all(fd, a, b) for a, b, _ in groups]
                local.bytes_read += sum(len(b) for b in blobs)
                found.update(_slice(groups, blobs, spans, where))
                return
            with os.fdopen(os.dup(fd), "rb") as f:
                stream_members(f, set(req.keys), local, found)
        finally:
            os.close(fd)
            stats.bytes_cached += local.bytes_read
            stats.requests += 1


def _attempt(fetch: Callable[[], tuple[bytes, Optional[int]]]):
    """`fetch()`'s (bytes, total size), or the exception it raised (NotRangeable is raised on)."""
    try:
        return fetch()
    except NotRangeable:
        raise
    except Exception as e:  # OSError, EOFError, botocore errors: this request's members are lost
        return e


def _slice(groups, blobs, spans, where) -> dict[str, dict[str, bytes]]:
    found: dict[str, dict[str, bytes]] = {}
    for (start, _end, members), blob in zip(groups, blobs):
        for i in members:
            off, size = spans[i]
            key, ext = where[i]
            found.setdefault(key, {})[ext] = blob[off - start : off - start + size]
    return found

