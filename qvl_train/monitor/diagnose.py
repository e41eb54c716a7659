"""Diagnosing hangs, stragglers and slow steps on a live run.

* `StackDumper` — every rank writes the Python stack of each of its threads to
  `output_dir/stacks/rank{R}.txt` on SIGUSR2 (`scancel --signal=USR2 JOB` or `kill -USR2`), when a
  collective times out (`train.collective_timeout_s`), and from a watchdog thread when one step takes
  longer than that timeout (a hang outside any collective: a stuck loader, a dead filesystem). Ranks
  whose stacks differ from the others' are where to look. On a collective timeout each rank that can
  still run also appends a hang report to `output_dir/stacks/summary.txt`: one line per rank of the
  world, naming its stack file, or "no stacks (stopped or dead)" for a rank that wrote none since the
  last step every rank finished (SIGSTOPped, killed, or stuck in C code without the GIL); such a rank's
  own file gets that line too, instead of staying empty.
* `straggler_report` — per-rank step times gathered at each logged step; names the ranks slower than
  `train.straggler_threshold` × the median (a sick GPU, a throttled node, a slow data path).
  `StragglerWindow` turns those per-step verdicts into warnings: a rank is named only when it was slow
  in most of the last `train.straggler_window` logged steps, and at most once per window (one noisy
  step on a busy host is no straggler).
* `StepProfiler` — `profile.steps=[A,B]`: a torch profiler trace of steps A..B per rank, written to
  `output_dir/profile/rank{R}.steps{A}-{B}.json` (open in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import signal
import socket
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger("qvl_train")

__all__ = ["StackDumper", "straggler_report", "StragglerWindow", "StepProfiler", "is_timeout"]


def is_timeout(exc: BaseException) -> bool:
    """Whether `exc` is a collective that ran past the process group's timeout (gloo or NCCL wording)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(key in text for key in ("timed out", "timeout", "watchdog caught collective operation"))


class StackDumper:
    """Writes this rank's thread stacks to `out/stacks/rank{R}.txt` on SIGUSR2, on demand, and on a stall.

    `heartbeat()` once per step arms the watchdog: when no heartbeat comes for `stall_s` seconds, the
    stacks are written once (the run is not stopped: the collective timeout or the operator decides).
    """

    def __init__(self, out: Path, rank: int, stall_s: float, world: int = 1, peer_wait_s: float = 5.0) -> None:
        self.path = Path(out) / "stacks" / f"rank{rank}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.stall_s, self.world, self.peer_wait_s = rank, stall_s, world, peer_wait_s
        self._beat_wall = time.time()  # wall clock of the last heartbeat: stacks written after it belong to this hang
        self._file = open(self.path, "a", buffering=1)
        self._signal_registered = hasattr(signal, "SIGUSR2")
        if self._signal_registered:  # faulthandler writes from C: works while Python is stuck in a collective
            faulthandler.register(signal.SIGUSR2, file=self._file, all_threads=True, chain=False)
        self._beat = time.monotonic()
        self._step = 0
        self._stalled_at: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qvl-stall-watchdog", daemon=True)
        self._thread.start()

    def heartbeat(self, step: int) -> None:
        self._beat, self._step, self._beat_wall = time.monotonic(), step, time.time()

    def hang_report(self) -> Path:
        """After a collective timeout: wait up to `peer_wait_s` for the other ranks' stacks, then append one line
        per rank to `stacks/summary.txt` — its stack file, or "no stacks (stopped or dead)" when it wrote none
        since this rank's last heartbeat (that rank's empty or stale file gets the same line). Returns the summary."""
        files = [self.path.parent / f"rank{r}.txt" for r in range(self.world)]

        def fresh(f: Path) -> bool:
            try:
                st = f.stat()
            except FileNotFoundError:
                return False
            return st.st_size > 0 and st.st_mtime >= self._beat_wall - 0.05  # file times lag the clock by a tick

        deadline = time.monotonic() + self.peer_wait_s
        while not all(fresh(f) for f in files) and time.monotonic() < deadline:
            time.sleep(0.1)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        lines = [f"=== hang report by rank {self.rank} at {now}: collective timed out after step {self._step}"]
        for r, f in enumerate(files):
            if fresh(f):
                lines.append(f"rank {r}: stacks in {f.name}")
                continue
            lines.append(f"rank {r}: no stacks (stopped or dead)")
            with open(f, "a") as peer:  # an empty file would read as "nothing to see"
                peer.write(f"\n=== rank {r}: no stacks (stopped or dead) at {now}, reported by rank {self.rank}: it wrote "
                           f"none within {self.peer_wait_s:g} s of the collective timeout after step {self._step}\n")
        summary = self.path.parent / "summary.txt"
        with open(summary, "a") as out:
            out.write("\n".join(lines) + "\n")
        return summary

    def dump(self, reason: str) -> Path:
        """Write a header and every thread's stack now; returns the file."""
        now = datetime.datetime.now().isoformat(timespec="seconds")
        self._file.write(f"\n=== rank {self.rank} on {socket.gethostname()} at {now}, step {self._step}: {reason}\n")
        self._file.flush()
        faulthandler.dump_traceback(file=self._file, all_threads=True)
        self._file.flush()
        return self.path

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.stall_s / 4)):
            stalled = time.monotonic() - self._beat
            if stalled > self.stall_s and self._stalled_at != self._step:
                self._stalled_at = self._step
                self.dump(f"no progress for {stalled:.0f} s after step {self._step} "
                          f"(train.collective_timeout_s={self.stall_s:g})")
                log.warning("rank %d: step %d has not finished after %.0f s; stacks in %s",
                            self.rank, self._step + 1, stalled, self.path)

    def __enter__(self) -> "StackDumper":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """A collective timeout: write the stacks and stop with a message that says where they are."""
        if exc is None or not is_timeout(exc):
            self.close()
            return False
        import traceback

        self.dump(f"collective timed out: {type(exc).__name__}: {exc}")
        traceback.print_exception(exc, file=self._file)
        self._file.flush()
        summary = self.hang_report()
        self.close()
        raise SystemExit(
            f"rank {self.rank}: a collective waited longer than train.collective_timeout_s={self.stall_s:g} s "
            f"(after step {self._step}). Every rank that can still run wrote its stacks to {self.path.parent}; "
            f"{summary.name} there names the ranks that wrote none (stopped or dead). The ranks whose stacks differ "
            "from the others' are the ones that hung. Rerun the same command to resume."
        ) from exc

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        if self._signal_registered:
            faulthandler.unregister(signal.SIGUSR2)
        self._file.close()


def straggler_report(
    step_times: Sequence[float], hosts: Sequence[str], threshold: float
) -> tuple[dict[str, float], Optional[str]]:
    """Metrics and (when a rank is slow) a message from every rank's wall time of the same step.

    A rank is a straggler when its step took more than `threshold` × the median; the message names each
    with its host, slowest first. All ranks of a synchronous step end together, so the time compared is
    what each rank spent outside waiting on others (its own data + compute), as the caller measures it.
    """
    median = statistics.median(step_times)
    slowest = max(range(len(step_times)), key=lambda r: step_times[r])
    metrics = {
        "straggler/max_over_median": step_times[slowest] / max(median, 1e-9),
        "straggler/slowest_rank": float(slowest),
    }
    if threshold <= 0:
        return metrics, None
    slow = sorted((r for r, t in enumerate(step_times) if t > threshold * median), key=lambda r: -step_times[r])
    if not slow:
        return metrics, None
    names = ", ".join(f"rank {r} on {hosts[r]} ({step_times[r]:.3f} s)" for r in slow)
    return metrics, f"stragglers (> {threshold:g} × median {median:.3f} s): {names}"


class StragglerWindow:
    """Straggler warnings over a window of logged steps instead of per step.

    `update(step_times, hosts)` takes every rank's own time of one logged step. A rank is a straggler
    when, over the last `window` logged steps, its time exceeded `threshold` × that step's median in
    more than half of them; it is then named once (its host and how much slower, as the median of
    its time / median ratios over the window) and not again before `window` more logged steps.
    Returns the per-step `straggler/*` metrics and the warning, if any."""

    def __init__(self, threshold: float, window: int) -> None:
        self.threshold, self.window = threshold, max(1, int(window))
        self._slow: dict[int, deque] = {}  # rank -> deque of (slow?, time / median) over the window
        self._quiet_until: dict[int, int] = {}  # rank -> update count before which it is not named again
        self._count = 0

    def update(self, step_times: Sequence[float], hosts: Sequence[str]) -> tuple[dict[str, float], Optional[str]]:
        metrics, _ = straggler_report(step_times, hosts, 0)
        if self.threshold <= 0:
            return metrics, None
        self._count += 1
        median = max(statistics.median(step_times), 1e-9)
        named = []
        for rank, t in enumerate(step_times):
            seen = self._slow.setdefault(rank, deque(maxlen=self.window))
            seen.append((t > self.threshold * median, t / median))
            slow = [ratio for is_slow, ratio in seen if is_slow]
            if len(seen) == self.window and 2 * len(slow) > self.window and self._count >= self._quiet_until.get(rank, 0):
                self._quiet_until[rank] = self._count + self.window
                named.append((statistics.median(slow), rank, len(slow)))
        if not named:
            return metrics, None
        names = ", ".join(f"rank {r} on {hosts[r]} ({ratio:.2f}× the median in {n} of them)"
                          for ratio, r, n in sorted(named, reverse=True))
        return metrics, (f"stragglers over the last {self.window} logged steps (> {self.threshold:g} × the median "
                         f"step time in most of them): {names}")


class StepProfiler:
    """torch profiler over steps [first, last] (1-based, as metrics.jsonl counts) on every rank."""

    def __init__(self, steps: Sequence[int], out: Path, rank: int) -> None:
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.path = Path(out) / "profile" / f"rank{rank}.steps{self.first}-{self.last}.json"
        self._prof: Optional[torch.profiler.profile] = None

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run."""
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False)
            self._prof.__enter__()

    def after_step(self, step: int) -> Optional[Path]:
        """Call with the number of the step that just ran; returns the trace file when it was written."""
        if self._prof is None or step != self.last:
            return None
        self._prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.path))
        self._prof = None
        return self.path
