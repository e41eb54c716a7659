"""Checkpoints: one `TrainState` per step directory, saved with megatron-core `dist_checkpointing`.

Layout (`output_dir/checkpoints/`):
    step_0000040/        dist_checkpointing files (layout-independent sharded tensors + common.pt)
    step_0000040/complete   written last, after every rank finished writing
    latest               text file naming the newest complete step directory, replaced atomically

What a checkpoint holds: model weights, AdamW moments and step count, the `TrainState` (step,
consumed samples/tokens, data-loader cursor, wandb run id, layout it was written with) and the RNG
state of every rank. Tensors are sharded by global names and offsets, so a checkpoint written at
tp=2 loads at pp=2 or dp=4. The per-rank RNG state is restored only when the layout is unchanged.

Note: `dist_checkpointing` saves through worker processes; every script that saves must guard its
entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from qvl_train.parallel.dims import ParallelDims

log = logging.getLogger(__name__)
COMPLETE = "complete"
LATEST = "latest"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: Optional[str] = None
    layout: dict[str, int] = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def resolve_checkpoint(path: str | Path) -> Optional[Path]:
    """A step directory, or a checkpoint root whose `latest` names one. None if nothing complete."""
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    latest = path / LATEST
    if latest.exists():
        step_dir = path / latest.read_text().strip()
        if (step_dir / COMPLETE).exists():
            return step_dir
    if (path / "checkpoints").is_dir():
        return resolve_checkpoint(path / "checkpoints")
    return None


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Saves and restores `TrainState` + engine state under `root` (= output_dir/checkpoints)."""

    def __init__(self, root: str | Path, dims: ParallelDims) -> None:
        self.root = Path(root)
        self.dims = dims

    def _layout(self) -> dict[str, int]:
        d = self.dims
        return {"tp": d.tp, "pp": d.pp, "cp": d.cp, "dp": d.dp, "world": d.world_size}

    def _rng_object(self, data: Any):
        from megatron.core.dist_checkpointing import ShardedObject

        d = self.dims
        return ShardedObject(
            "rng_state", data, global_shape=(d.pp, d.tp, d.dp),
            global_offset=(d.pp_rank, d.tp_rank, d.dp_rank), replica_id=0,
        )

    # ----------------------------------------------------------------- save
    def save(self, engine, state: TrainState) -> Path:
        from megatron.core import dist_checkpointing

        step_dir = self.root / step_dir_name(state.step)
        if dist.get_rank() == 0:
            step_dir.mkdir(parents=True, exist_ok=True)
            (step_dir / COMPLETE).unlink(missing_ok=True)
        dist.barrier()
        state.layout = self._layout()
        sharded = engine.sharded_state_dict(with_optimizer=True)
        sharded["train_state"] = asdict(state)
        sharded["optimizer_steps"] = engine.optimizer_step_count()
        sharded["rng"] = self._rng_object(_rng_state())
        dist_checkpointing.save(sharded, str(step_dir))
        dist.barrier()
        if dist.get_rank() == 0:
            (step_dir / COMPLETE).write_text(f"{state.step}\n")
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(step_dir.name + "\n")
            os.replace(tmp, self.root / LATEST)
        dist.barrier()
        return step_dir

    # ----------------------------------------------------------------- load
    def restore(self, engine, *, resume: str, init_from: Optional[str]) -> tuple[TrainState, str]:
        """Resume this run (full state) or take weights from `init_from`; returns (state, what)."""
        own = resolve_checkpoint(self.root) if resume == "auto" else None
        if own is not None:
            return self._load(engine, own, full=True), f"resumed from {own}"
        if init_from:
            src = resolve_checkpoint(init_from)
            if src is None:
                raise FileNotFoundError(
                    f"model.init_from={init_from!r} holds no complete checkpoint "
                    "(expected a step directory with a 'complete' file, or a root with 'latest')"
                )
            self._load(engine, src, full=False)
            return TrainState(), f"weights initialised from {src}"
        return TrainState(), "fresh start"

    def _load(self, engine, step_dir: Path, *, full: bool) -> TrainState:
        from megatron.core import dist_checkpointing

        common = dist_checkpointing.load_common_state_dict(str(step_dir))
        saved = TrainState(**common["train_state"])
        same_layout = saved.layout == self._layout()
        request = engine.sharded_state_dict(with_optimizer=full)
        if full and same_layout:
            request["rng"] = self._rng_object(None)
        loaded = dist_checkpointing.load(request, str(step_dir))
        engine.load_sharded(loaded, with_optimizer=full)
        if not full:
            return TrainState()
        engine.set_optimizer_step_count(int(common.get("optimizer_steps", saved.step)))
        if same_layout:
            _set_rng_state(loaded["rng"])
        else:
            log.warning("layout changed %s -> %s: per-rank RNG state not restored", saved.layout, self._layout())
        return saved
