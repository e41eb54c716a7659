"""How long steps waited for their batches: `time/data_wait_s` and the starved-GPU warning.

The loop times `loader.next_step()` on every rank and every step. `DataWait` sums those waits and the
step times on each rank between two logged steps; at a logged step the sums travel in the tensor that
the straggler report already all-gathers (`monitor/runlog.py`), so no collective is added. Reported:

* `time/data_wait_s` — the logged step's wait, max over ranks (a step is as slow as its slowest rank);
* `time/data_wait_share` — Σ wait / Σ step time since the previous logged step, max over ranks.

`DataWait.update` warns (rank 0 logs it) when, over the last `window` steps (at least that many,
counted in steps, whatever `train.log_every` is), the slowest rank waited more than `threshold` of
the step time, and names the fix: more decode workers (`data.num_workers`) and the CPUs per task
that feed them. Once warned, it stays quiet for another `window` steps.
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

THRESHOLD = 0.05
"""Data-wait share of step time above which a window is reported (5%)."""
WINDOW = 20
"""Steps a data-wait verdict looks back over."""


class DataWait:
    """Per-rank running sums between logged steps, and the windowed verdict on rank 0's side."""

    def __init__(self, threshold: float = THRESHOLD, window: int = WINDOW) -> None:
        self.threshold, self.window = threshold, max(1, int(window))
        self._wait = self._time = 0.0
        self._steps = 0
        self._seen: deque = deque()  # (steps, max-over-ranks wait, step time) per logged interval
        self._quiet = 0  # steps left before another warning

    def add(self, wait_s: float, step_s: float) -> None:
        """One step of this rank: how long it waited for its batch, how long the whole step took."""
        self._wait += wait_s
        self._time += step_s
        self._steps += 1

    def local(self) -> tuple[float, float]:
        """(Σ wait, Σ step time) of this rank since the previous logged step; resets the sums."""
        out = (self._wait, self._time)
        self._wait = self._time = 0.0
        return out

    def update(self, step_waits: Sequence[float], sums: Sequence[tuple[float, float]], num_workers: int,
               ) -> tuple[dict[str, float], Optional[str]]:
        """Every rank's wait of the logged step and its (Σ wait, Σ step) since the last logged step →
        the metrics and, at most once per window, the warning."""
        steps, self._steps = max(self._steps, 1), 0
        wait = max(w for w, _ in sums)
        total = max(t for _, t in sums)
        share = max(w / t if t > 0 else 0.0 for w, t in sums)
        metrics = {"time/data_wait_s": max(step_waits), "time/data_wait_share": share}
        self._seen.append((steps, wait, total))
        while sum(n for n, _, _ in self._seen) - self._seen[0][0] >= self.window:
            self._seen.popleft()
        self._quiet = max(self._quiet - steps, 0)
        covered = sum(n for n, _, _ in self._seen)
        window_wait, window_time = sum(w for _, w, _ in self._seen), sum(t for _, _, t in self._seen)
        window_share = window_wait / window_time if window_time > 0 else 0.0
        if covered < self.window or window_share <= self.threshold or self._quiet:
            return metrics, None
        self._quiet = self.window
        return metrics, (
            f"data wait: steps waited {window_share:.0%} of their time for batches over the last {covered} steps "
            f"(slowest rank; > {self.threshold:.0%}): the loader does not keep up with the model. "
            f"Raise data.num_workers (now {num_workers} per rank; `auto` takes the CPUs the job has) and give "
            f"each task more CPUs (SLURM --cpus-per-task), or lower the decode cost (data.max_pixels, "
            f"data.fast_decode, fewer video frames)."
        )
