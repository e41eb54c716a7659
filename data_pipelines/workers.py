"""Decode workers: `data.num_workers` processes per rank that build samples (`SampleBuilder.build`).

Why separate processes: decoding and preprocessing images is nearly all of the loader's time
(benchmarks/RESULTS.md, loader section) and it holds the GIL, so threads would not help and inline
building makes the GPU wait. The loader (stream.py) sends each sample's raw members to a worker and
receives the built sample back; which sample goes to which worker never changes the result, since
`SampleBuilder.build` is a pure function of the members and the config.

How the processes are started: a fresh interpreter running `python -m data_pipelines.workers`
(subprocess, no fork). `fork` is unsafe next to the torch / gloo / NCCL threads of a training
process, and multiprocessing's `spawn` and `forkserver` both re-import the trainer's `__main__`
(e.g. `qvl_train.train`, with megatron) in every child; this way a worker imports `data_pipelines`
only. Messages are pickles of plain Python values and numpy arrays (torch tensors travel as numpy
and are turned back on arrival) on two dedicated pipes, so nothing a library prints on stdout can
corrupt them. Arrays of `SHM_MIN_BYTES` or more (pixel values) go through a file in /dev/shm that
the loader maps and unlinks at once: a 31 MiB array took ~180-270 ms through the pipe (most of it in
the loader process, holding the GIL) against ~40 ms to write in the worker and ~30 ms to map and pack
(benchmarks/RESULTS.md, loader section). Without a writable /dev/shm they are pickled. A worker exits when its task pipe
reaches end-of-file: when the loader closes it,
and also when the training process dies in any way (the kernel closes the pipe), so no worker
outlives its rank.

How many: `data.num_workers=auto` (the default) is resolved per rank by `resolve_num_workers` from the
CPUs the job has (SLURM allocation, cgroup quota, affinity), one core per rank left to the loop.
"""

from __future__ import annotations

import glob
import mmap
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TENSOR = "__torch_tensor__"
_SHM = "__shm_array__"
SHM_MIN_BYTES = 1 << 18
"""Arrays this large or larger travel through /dev/shm instead of the pipe."""


def shm_prefix(loader_pid: int) -> str:
    """Name prefix of the /dev/shm files of the workers of one loader process (swept at close)."""
    return f"qvl-decode-{loader_pid}-"


def to_wire(value: Any, shm_dir: str | None = None) -> Any:
    """Replace torch tensors (at any depth of dicts, lists and tuples) by tagged numpy arrays and,
    with `shm_dir`, large arrays by tagged files there (the receiver's `from_wire` removes them)."""
    if isinstance(value, torch.Tensor):
        return {_TENSOR: to_wire(value.numpy(), shm_dir)}
    if isinstance(value, np.ndarray) and shm_dir is not None and value.nbytes >= SHM_MIN_BYTES:
        return _shm_put(value, shm_dir)
    if isinstance(value, dict):
        return {k: to_wire(v, shm_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_wire(v, shm_dir) for v in value)
    return value


def from_wire(value: Any) -> Any:
    """Inverse of `to_wire`: tagged numpy arrays become torch tensors again (same dtype and values),
    shared-memory files are mapped (copy-on-write) and unlinked."""
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return torch.from_numpy(from_wire(value[_TENSOR]))
        if set(value) == {_SHM}:
            return _shm_get(*value[_SHM])
        return {k: from_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_wire(v) for v in value)
    return value


def _shm_put(array: np.ndarray, shm_dir: str) -> Any:
    array = np.ascontiguousarray(array)
    fd, path = tempfile.mkstemp(dir=shm_dir, prefix=shm_prefix(os.getppid()))
    try:
        with os.fdopen(fd, "wb") as f:
            array.tofile(f)
    except OSError:  # /dev/shm full: send it through the pipe
        os.unlink(path)
        return array
    return {_SHM: (path, array.dtype.str, array.shape)}


def _shm_get(path: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(f.fileno()).st_size else b""
    finally:
        os.unlink(path)
    return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
"""cgroup v2 CPU quota of this container / job step: "QUOTA PERIOD" (µs) or "max PERIOD" (no quota)."""


def _slurm_tasks_on_node(env: dict[str, str]) -> int:
    """Tasks SLURM starts on this node: SLURM_NTASKS_PER_NODE, else the first entry of
    SLURM_TASKS_PER_NODE ("8(x4),4" → 8), else 1 (srun one task per node, e.g. torchrun inside)."""
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1").split(",")[0].split("(")[0]
    try:
        return max(1, int(raw))
    except ValueError:
        return 1


def _cgroup_cpus(path: str) -> int | None:
    """Whole CPUs of a cgroup v2 quota (at least 1), or None when there is no quota or no file."""
    try:
        quota, period = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, int(quota) // int(period))
    except (ValueError, ZeroDivisionError):
        return None


def _affinity_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return os.cpu_count()


def resolve_num_workers(value: Any, env: dict[str, str] | None = None,
                        cgroup_path: str = CGROUP_CPU_MAX) -> tuple[int, str]:
    """`data.num_workers` → (worker processes per rank, where the number came from).

    An integer is taken as it is. `"auto"`: the CPUs this node's share of the job really has —
    the fewest of SLURM's allocation (SLURM_CPUS_PER_TASK × the tasks SLURM runs on the node), the
    cgroup v2 quota (`/sys/fs/cgroup/cpu.max`) and this process's CPU affinity — divided by the
    ranks on the node (LOCAL_WORLD_SIZE from torchrun, else SLURM's tasks on the node), less one
    core per rank for the training loop itself; 0 (inline building) when nothing is left. When SLURM
    starts one task per rank (no torchrun: LOCAL_WORLD_SIZE unset), each task's affinity is its own
    share, so it counts once per task on the node. Example: 16 CPUs for 8 local ranks → 2 per rank
    → 1 worker.
    """
    if not (isinstance(value, str) and value == "auto"):
        return int(value), "data.num_workers"
    env = dict(os.environ) if env is None else env
    tasks = _slurm_tasks_on_node(env) if "SLURM_JOB_ID" in env or "SLURM_CPUS_PER_TASK" in env else 1
    local = int(env.get("LOCAL_WORLD_SIZE") or tasks)
    views: list[tuple[int, str]] = []
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        per_task = int(env["SLURM_CPUS_PER_TASK"])
        views.append((per_task * tasks, f"SLURM_CPUS_PER_TASK={per_task}" + (f" × {tasks} tasks" if tasks > 1 else "")))
    quota = _cgroup_cpus(cgroup_path)
    if quota is not None:
        views.append((quota, f"cgroup quota {quota} CPUs"))
    affinity = _affinity_cpus()
    if affinity:
        per_task = "LOCAL_WORLD_SIZE" not in env and tasks > 1
        views.append((affinity * tasks if per_task else affinity,
                      f"CPU affinity {affinity}" + (f" × {tasks} tasks" if per_task else "")))
    if not views:
        return 0, "auto: no CPU count found; inline building"
    cpus, source = min(views, key=lambda v: v[0])
    per_rank = cpus // max(local, 1)
    workers = max(per_rank - 1, 0)
    return workers, (f"auto: {cpus} CPUs ({source}) / {local} local rank{'s' if local != 1 else ''} = "
                     f"{per_rank} per rank, minus 1 for the training loop")


class WorkerError(RuntimeError):
    """A decode worker failed (crashed, or `build` raised something other than SkipSample)."""


class DecodePool:
    """`n` worker processes building samples; `submit()` is thread-safe and returns a Future.

    `config` (the DataConfig) is pickled to each worker, which makes its SampleBuilders with
    `stream.make_builders`, exactly as the loader does for inline building. Per worker, a feeder
    thread keeps up to `depth` tasks in its pipe and a collector thread receives the replies in
    order, so a worker never idles while the loader process is busy (the GIL) between two samples.
    """

    def __init__(self, n: int, config: Any, depth: int = 2):
        if n < 1:
            raise ValueError(f"DecodePool needs at least one worker, got {n}")
        self._tasks: queue.Queue = queue.Queue()
        self.workers = [_Worker(i, config, self._tasks, depth) for i in range(n)]
        self._closed = False
        # Also when the loader is dropped without close() and at interpreter exit.
        self._finalizer = weakref.finalize(self, _close_workers, list(self.workers), self._tasks)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def submit(self, source: int, members: dict[str, bytes]) -> Future:
        """Queue one sample; the Future gives ("ok", sample) or ("skip", (reason, detail)), or raises
        WorkerError. Cancelling it before a worker takes it drops the task."""
        if self._closed:
            raise WorkerError("the decode pool is closed")
        fut: Future = Future()
        self._tasks.put((fut, source, members))
        return fut

    def close(self) -> None:
        """End every worker (end-of-file on its task pipe, then terminate if it lingers) and reap it."""
        self._closed = True
        self._finalizer()


def _close_workers(workers: list["_Worker"], tasks: queue.Queue) -> None:
    while True:  # tasks no worker took yet are dropped, not built
        try:
            item = tasks.get_nowait()
        except queue.Empty:
            break
        if item is not None:
            item[0].cancel()
    for _ in workers:
        tasks.put(None)  # each feeder stops at one
    for w in workers:
        w.close()
    _sweep_shm(os.getpid())  # results nobody received (a worker killed while replying, a reply never read)


def _sweep_shm(loader_pid: int) -> None:
    """Remove the /dev/shm files that workers of the loader process `loader_pid` left behind."""
    for path in glob.glob(os.path.join(_shm_dir() or "/nonexistent", shm_prefix(loader_pid) + "*")):
        try:
            os.unlink(path)
        except OSError:
            pass


def _shm_dir() -> str | None:
    """/dev/shm when it is a writable directory (Linux), else None: results travel through the pipe."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class _Worker:
    """Parent-side handle of one worker process: its two pipes, its feeder and collector threads."""

    def __init__(self, index: int, config: Any, tasks: queue.Queue, depth: int):
        self.index = index
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("OMP_NUM_THREADS", "1")  # one core per worker; the pool is the parallelism
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "data_pipelines.workers", str(task_r), str(res_w)],
            pass_fds=(task_r, res_w), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        os.close(task_r)
        os.close(res_w)
        self.pipe, self.results = Connection(task_w, readable=False), Connection(res_r, writable=False)
        self.pipe.send_bytes(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))
        self.outstanding: deque[Future] = deque()  # sent, reply not yet received (FIFO)
        self.slots = threading.Semaphore(depth)
        self.dead = False
        self.lock = threading.Lock()  # dead + outstanding change together
        self.threads = [
            threading.Thread(target=self._feed, args=(tasks,), name=f"decode-feed-{index}", daemon=True),
            threading.Thread(target=self._collect, name=f"decode-collect-{index}", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _error(self, what: str) -> WorkerError:
        return WorkerError(
            f"decode worker {self.index} (pid {self.proc.pid}) {what} (exit code {self.proc.poll()}); its "
            "error is on stderr above. Set data.num_workers=0 to build samples in the training process."
        )

    def _feed(self, tasks: queue.Queue) -> None:
        while True:
            item = tasks.get()
            if item is None:
                return
            fut, source, members = item
            if not fut.set_running_or_notify_cancel():
                continue
            self.slots.acquire()
            with self.lock:
                if not self.dead:
                    self.outstanding.append(fut)
            if self.dead:
                self.slots.release()
                fut.set_exception(self._error("exited"))
                continue
            try:
                self.pipe.send_bytes(pickle.dumps((source, members), protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:  # the collector fails the outstanding futures
                pass

    def _collect(self) -> None:
        while True:
            try:
                kind, payload = pickle.loads(self.results.recv_bytes())
            except (EOFError, OSError):
                break
            with self.lock:
                fut = self.outstanding.popleft()
            self.slots.release()
            if kind == "error":
                fut.set_exception(WorkerError(f"decode worker {self.index} failed to build a sample:\n{payload}"))
            else:
                fut.set_result((kind, from_wire(payload) if kind == "ok" else payload))
        with self.lock:
            self.dead = True
            lost = list(self.outstanding)
            self.outstanding.clear()
        for fut in lost:
            fut.set_exception(self._error("exited"))
            self.slots.release()

    def close(self) -> None:
        self.threads[0].join()  # the feeder took its stop marker: nothing more is sent
        self.pipe.close()  # end-of-file: the worker's loop ends
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # busy with a huge sample; it holds no state worth keeping
            self.proc.kill()
            self.proc.wait()
        self.threads[1].join()
        self.results.close()


def _serve(task_fd: int, result_fd: int) -> None:
    """Worker: read the config, then build samples until the task pipe is closed."""
    tasks, results = Connection(task_fd, writable=False), Connection(result_fd, readable=False)
    loader_pid = os.getppid()
    try:
        _serve_loop(tasks, results, _shm_dir())
    finally:
        if os.getppid() != loader_pid:  # the loader died: remove the results it never mapped
            _sweep_shm(loader_pid)


def _serve_loop(tasks: Connection, results: Connection, shm_dir: str | None) -> None:
    from data_pipelines.stream import SkipSample, make_builders  # worker side only: stream imports us

    try:
        builders = make_builders(pickle.loads(tasks.recv_bytes()))
    except EOFError:
        return
    while True:
        try:
            source, members = pickle.loads(tasks.recv_bytes())
        except EOFError:
            return
        try:
            reply: tuple[str, Any] = ("ok", to_wire(builders[source].build(members), shm_dir))
        except SkipSample as e:
            reply = ("skip", (e.reason, str(e)))
        except Exception:
            reply = ("error", traceback.format_exc())
        try:
            results.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:  # the loader is gone (BrokenPipeError)
            return


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
