"""Weights & Biases logging from global rank 0 (offline by default: `wandb sync output_dir/wandb/...`).

The run id is kept in the checkpoint's TrainState, so a resumed or requeued run continues the same
wandb run instead of starting a new one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Optional

from qvl_train.config import WandbConfig


def _wandb_value(key: str, value: Any) -> Any:
    """An expert-load list (tokens per expert of one MoE layer) becomes a histogram with one bin per expert."""
    from qvl_train.monitor.metrics import EXPERT_LOAD_PREFIX

    if not key.startswith(EXPERT_LOAD_PREFIX):
        return value
    import numpy as np
    import wandb

    return wandb.Histogram(np_histogram=(np.asarray(value, dtype=np.float64), np.arange(len(value) + 1)))


class WandbLogger:
    def __init__(self, cfg: WandbConfig, output_dir: str | Path, config: dict[str, Any], run_id: Optional[str]) -> None:
        self.run = None
        self.run_dir: Optional[str] = None
        if cfg.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        output_dir = Path(output_dir)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name or output_dir.name, tags=list(cfg.tags),
            mode=cfg.mode, dir=str(output_dir), config=config, id=run_id or secrets.token_hex(4),
            resume="allow", settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.run_dir = str(Path(self.run.dir).parent)

    @property
    def run_id(self) -> Optional[str]:
        return self.run.id if self.run is not None else None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: _wandb_value(k, v) for k, v in record.items() if k not in ("kind", "step")}, step=step)

    def log_examples(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        """A table of image, question, answer and model answer (evaluation examples)."""
        if self.run is None or not rows:
            return
        import wandb

        table = wandb.Table(columns=["sample_id", "image", "question", "answer", "model answer"])
        for r in rows:
            image = wandb.Image(r["image"]) if r.get("image") is not None else None
            table.add_data(r["sample_id"], image, r["prompt"], r["answer"], r["model_answer"])
        self.run.log({key: table}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a non-zero `exit_code` marks it failed (the offline run records it for `wandb sync`)."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
