"""Graceful stop: SIGTERM or SIGUSR1 → finish the current step, save a checkpoint, exit.

SLURM sends SIGUSR1 before a time limit (`#SBATCH --signal=B:USR1@120`) and SIGTERM on preemption;
torchrun forwards SIGTERM to its workers. A signal may reach only some ranks, so the flag is
all-reduced (MAX) once per step and every rank stops at the same step boundary.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopOnSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int = 0
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum

    def agreed(self) -> int:
        """The signal any rank received since start (0 if none); a collective, call on every rank."""
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)  # NCCL: CUDA tensors only
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
