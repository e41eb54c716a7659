"""Held-out evaluation during training: `data.valid` sources, every `eval.every` steps.

Per source: `loss` (global per-label-token mean cross-entropy) and `accuracy`, the exact-match rate
of greedy generation over the evaluated samples (see `GreedyMatch`). Each source gets its own
`StepLoader` (the same data config, that source alone, no planning thread);
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


class GreedyMatch:
    """Exact match of greedy decoding, read off the teacher-forced forward of `eval_step`.

    Greedy generation reproduces a sample's answer token for token (its end-of-turn token included)
    exactly when, at every label position, the argmax given the true prefix is the label; by induction
    over the answer the first wrong argmax is where generation would leave it. So one forward decides
    it: a forward hook on the LLM's output layer (last pipeline stage; logits only at label positions,
    `[n, 1, V/tp]`) keeps the argmax over the tensor-parallel vocabulary of every micro-batch.
    """

    def __init__(self, model: torch.nn.Module, dims) -> None:
        self.layer = getattr(getattr(model, "llm", None), "output_layer", None)  # None off the last stage
        self.dims = dims
        self.preds: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> "GreedyMatch":
        self.preds = []
        if self.layer is not None:
            self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args, output) -> None:
        logits = (output[0] if isinstance(output, tuple) else output).detach().flatten(0, -2).float()
        value, index = logits.max(dim=-1)
        index = index + self.dims.tp_rank * logits.shape[-1]  # this rank's vocabulary slice
        if self.dims.tp > 1:  # the first maximum over the whole row, as argmax over unsplit logits
            group = self.dims.groups["tp"]
            values = [torch.empty_like(value) for _ in range(self.dims.tp)]
            indices = [torch.empty_like(index) for _ in range(self.dims.tp)]
            torch.distributed.all_gather(values, value, group=group)
            torch.distributed.all_gather(indices, index, group=group)
            best = torch.stack(values).argmax(0, keepdim=True)
            index = torch.stack(indices).gather(0, best).squeeze(0)
        self.preds.append(index.cpu())

    def count(self, batches: list) -> tuple[int, int]:
        """(samples whose every label token is the argmax, samples with labels) over `batches`."""
        from data_pipelines.schema import IGNORE_INDEX

        exact = answered = 0
        for batch, pred in zip(batches, self.preds):
            targets = torch.nonzero(batch.labels != IGNORE_INDEX).squeeze(1)
            sample = torch.bucketize(targets, batch.cu_seqlens[1:].long(), right=True)
            n = max(batch.num_samples, 1)
            labelled = torch.bincount(sample, minlength=n) > 0
            wrong = torch.bincount(sample, weights=(pred != batch.labels[targets]).double(), minlength=n)
            exact += int((labelled & (wrong == 0)).sum())
            answered += int(labelled.sum())
        return exact, answered


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

        self.dims = dims
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
                batches = loader.next_step()
                with GreedyMatch(engine.model, self.dims) as probe:
                    loss_sum, labels = engine.eval_step(batches)
                exact, answered = self._global_counts(probe.count(batches))
                records.append({"kind": "eval", "step": step, "source": name,
                                "loss": loss_sum / max(labels, 1), "label_tokens": labels,
                                "accuracy": exact / max(answered, 1), "answers": answered})
        return records

    def _global_counts(self, local: tuple[int, int]) -> tuple[int, int]:
        """Sum over data-parallel ranks (counted where the logits are: last stage, tensor rank 0)."""
        dims = self.dims
        mine = local if dims.is_last_stage and dims.tp_rank == 0 else (0, 0)
        counts = torch.tensor(mine, dtype=torch.float64, device=dims.device)
        torch.distributed.all_reduce(counts, group=dims.groups["world"])
        return int(counts[0]), int(counts[1])

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()
