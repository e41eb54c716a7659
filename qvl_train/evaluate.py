"""Held-out evaluation during training: `data.valid` sources, every `eval.every` steps.

Each source gets its own `StepLoader` (the same data config, that source alone, no planning thread);
its start state is kept and restored before every evaluation, so each evaluation reads the same
`eval.max_batches` micro-batches, dealt to data-parallel ranks like a training step. The loss is the
global per-label-token mean over them (the engine's forward-only `eval_step`). Nothing here touches
the training loader, the optimizer or the RNG state, so training is the same with or without it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch

from data_pipelines.schema import DataSource
from qvl_train.config import TrainConfig


def source_names(sources: list[DataSource]) -> list[str]:
    """A short, unique name per source for metrics (`eval/<name>/loss`): the last part of its path."""
    names: list[str] = []
    for i, src in enumerate(sources):
        tail = src.path.rstrip("/").rsplit("/", 1)[-1]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", tail).strip("_.") or f"valid{i}"
        names.append(f"{name}_{i}" if name in names else name)
    return names


class Evaluator:
    """`due(step)` says when; `run(engine, step)` returns one `"kind": "eval"` record per source."""

    def __init__(self, cfg: TrainConfig, dims) -> None:
        from data_pipelines.stream import StepLoader

        self.every = cfg.eval.every if cfg.data.valid else 0
        self.names = source_names(cfg.data.valid)
        self.loaders = [
            StepLoader(
                replace(cfg.data, sources=[replace(src, weight=1.0)], valid=[], plan_ahead=False),
                micro_batches_per_step=cfg.eval.max_batches, dp_rank=dims.dp_rank, dp_size=dims.dp,
            )
            for src in (cfg.data.valid if self.every else [])
        ]
        self.starts = [loader.state_dict() for loader in self.loaders]
        self.devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def run(self, engine, step: int) -> list[dict[str, Any]]:
        records = []
        with torch.random.fork_rng(devices=self.devices):  # training's RNG stream stays as it was
            for name, loader, start in zip(self.names, self.loaders, self.starts):
                loader.load_state_dict(start)
                loss_sum, labels = engine.eval_step(loader.next_step())
                records.append({"kind": "eval", "step": step, "source": name,
                                "loss": loss_sum / max(labels, 1), "label_tokens": labels})
        return records

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()
