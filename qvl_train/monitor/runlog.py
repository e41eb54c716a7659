"""What a run reports as it goes: metrics.jsonl, the progress line, wandb and the closing summary.

One `RunLog` per run, built on every rank (the wandb run id is broadcast from rank 0 so every rank
saves the same `TrainState`; host names are gathered for the straggler report) — only global rank 0
writes. It is a context manager: leaving it finishes the wandb run on every exit path (exit code 1
when an exception ends the run: a crash, the bad-step stop, a collective timeout) and closes
metrics.jsonl; after a run that ended normally (or on a stop signal) it prints where things are.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from qvl_train.monitor.data_wait import DataWait
from qvl_train.monitor.diagnose import StragglerWindow
from qvl_train.monitor.metrics import MetricsWriter, Progress, train_record

log = logging.getLogger("qvl_train")


def global_data_stats(local: dict[str, int], dims) -> dict[str, int]:
    """Skip counts and the step's shard bytes (`data/bytes_read`, `data/bytes_used`) summed over
    data-parallel ranks (each sample is read by one dp rank's group; its tp/pp/cp peers read the same
    bytes again, which does not change the read / used ratio)."""
    import torch.distributed as dist

    gathered: list = [None] * dims.world_size
    dist.all_gather_object(gathered, local if dims.tp_rank == dims.pp_rank == dims.cp_rank == 0 else {})
    total: dict[str, int] = {"data_skipped": 0}
    for stats in gathered:
        for key, n in stats.items():
            total[key] = total.get(key, 0) + int(n)
    return total


def straggler_stats(own_s: float, hosts: list, window, dims, data_wait=None, wait_s: float = 0.0,
                    num_workers: int = 0) -> dict[str, float]:
    """Every rank's own step time (data + forward/backward) → `straggler/*` metrics; rank 0 warns when
    `window` (a `StragglerWindow`) names a rank slow over most of its last logged steps. With
    `data_wait` (a `DataWait`), the same all-gather carries this rank's wait for the step's batch
    (`wait_s`) and its wait / step-time sums since the last logged step → `time/data_wait_*`."""
    own = [own_s, wait_s, *(data_wait.local() if data_wait is not None else (0.0, 0.0))]
    times = [torch.zeros(len(own), dtype=torch.float64, device=dims.device) for _ in range(dims.world_size)]
    torch.distributed.all_gather(times, torch.tensor(own, dtype=torch.float64, device=dims.device))
    rows = [[float(v) for v in t.tolist()] for t in times]
    metrics, warning = window.update([r[0] for r in rows], hosts)
    if warning and dims.is_logging_rank:
        log.warning(warning)
    if data_wait is not None:
        waits, warning = data_wait.update([r[1] for r in rows], [(r[2], r[3]) for r in rows], num_workers)
        metrics.update(waits)
        if warning and dims.is_logging_rank:
            log.warning(warning)
    return metrics


def run_failed(exc: Optional[BaseException]) -> bool:
    """Whether an exception leaving the run is a failure (anything but a successful SystemExit)."""
    return exc is not None and not (isinstance(exc, SystemExit) and exc.code in (0, None))


class RunLog:
    """Rank 0's metrics.jsonl, progress line and wandb run; the other ranks join its collectives."""

    def __init__(self, cfg, dims, state) -> None:
        """`state`: the restored TrainState; metrics.jsonl is cut back to its step, and its wandb run
        id (none on a fresh start) is continued, then set on every rank."""
        from qvl_train.monitor.flops import peak_tflops
        from qvl_train.monitor.wandb import WandbLogger

        self.cfg, self.dims, self.out = cfg, dims, Path(cfg.output_dir)
        self.active = dims.is_logging_rank  # global rank 0 writes; the others only take part in collectives
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", resume_step=state.step) if self.active else None
        self.wandb = WandbLogger(cfg.wandb, self.out, asdict(cfg), state.wandb_run_id) if self.active else None
        self._open = self.active
        run_id = [self.wandb.run_id if self.wandb is not None else None]
        torch.distributed.broadcast_object_list(run_id, src=0)  # every rank saves the same TrainState
        state.wandb_run_id = run_id[0]
        self.progress = Progress(cfg.train.max_steps, state.step)
        self.peak = peak_tflops(cfg.train.peak_tflops)
        self.hosts: list = [None] * dims.world_size
        self.stragglers = StragglerWindow(cfg.train.straggler_threshold, cfg.train.straggler_window)
        self.data_wait = DataWait()
        torch.distributed.all_gather_object(self.hosts, socket.gethostname())

    def write(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl (rank 0; a no-op elsewhere)."""
        if self.metrics is not None:
            self.metrics.write(record)

    def train_step(
        self, step: int, result, *, lr: float, loader, plan: dict[str, float], data_s: float, step_s: float,
        checkpoint_s: float, skipped_steps: int, force: bool = False,
    ) -> None:
        """The `"kind": "train"` line of step `step` every `train.log_every` steps, at the last step and
        when `force`d; on every rank (the data skip counts and the per-rank step times are gathered)."""
        train = self.cfg.train
        self.data_wait.add(data_s, step_s)  # every step; reported (max over ranks) at logged steps
        if not (step % train.log_every == 0 or step == train.max_steps or force):
            return
        skipped = global_data_stats({**loader.stats(), **loader.io_stats()}, self.dims)  # + data/bytes_read, _used
        own_s = data_s + result.timings["fwd_bwd_s"]
        stragglers = straggler_stats(own_s, self.hosts, self.stragglers, self.dims, self.data_wait, data_s,
                                     self.cfg.data.num_workers)
        if not self.active:
            return
        record = train_record(
            step, result, lr=lr, step_time_s=step_s, data_s=data_s, checkpoint_s=checkpoint_s,
            world_size=self.dims.world_size, peak_tflops=self.peak, skipped_steps=skipped_steps,
        )
        record.update(skipped)
        record.update(stragglers)
        record.update({f"data/plan_{k}": v for k, v in plan.items() if k != "est_flops"})
        self.metrics.write(record)
        self.wandb.log(record, step=step)
        self.progress.update(step, result.loss, record["tokens_per_s"], step_s)

    def close(self, failed: bool = False) -> None:
        """Close metrics.jsonl and finish the wandb run (exit code 1 if `failed`), once; after a run
        that did not fail, log where its metrics, last checkpoint and wandb run are."""
        if not self._open:
            return
        self._open = False
        self.metrics.close()
        self.wandb.finish(exit_code=1 if failed else 0)
        if failed:
            return
        log.info("metrics     %s", self.out / "metrics.jsonl")
        latest = self.out / "checkpoints" / "latest"
        if latest.exists():
            log.info("checkpoint  %s", self.out / "checkpoints" / latest.read_text().strip())
        if self.wandb.run_dir:
            log.info("wandb       %s  (upload: wandb sync %s)", self.wandb.run_dir, self.wandb.run_dir)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=run_failed(exc))
        return False

