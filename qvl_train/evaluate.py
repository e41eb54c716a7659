"""Held-out evaluation during training: `data.valid` sources, every `eval.every` steps.

Per source: `loss` (global per-label-token mean cross-entropy) and `accuracy`, the exact-match rate
of greedy generation over the evaluated samples (see `GreedyMatch`), and `examples`: a few samples
with their image, prompt, answer and the model's greedy answer (a wandb table; text in metrics.jsonl). Each source gets its own
`StepLoader` (the same data config, that source alone, no planning thread);
its start state is kept and restored before every evaluation, so each evaluation reads the same
`eval.max_batches` micro-batches, dealt to data-parallel ranks like a training step. The loss is the
global per-label-token mean over them (the engine's forward-only `eval_step`). Nothing here touches
the training loader, the optimizer or the RNG state, so training is the same with or without it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

import torch

from data_pipelines.schema import DataSource
from qvl_train.config import TrainConfig

log = logging.getLogger("qvl_train")


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
        self.context_parallel = getattr(model, "context_parallel", None)
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

    def collect(self, batches: list) -> None:
        """Under parallel.cp each rank predicted the labels of its own rows: put every micro-batch's
        predictions in the order of the whole row's label positions (gathered over the CP group)."""
        cp = self.context_parallel
        if cp is None or not self.preds:
            return
        from data_pipelines.schema import IGNORE_INDEX
        from qvl_train.parallel.context import gather_ragged

        full = []
        for batch, pred in zip(batches, self.preds):
            split = cp.split(batch.cu_seqlens)
            rows = split.src[torch.nonzero(split.labels(batch.labels) != IGNORE_INDEX).squeeze(1)]
            pairs = gather_ragged(torch.stack([rows, pred.long()], dim=1).to(self.dims.device), cp.group).cpu()
            full.append(pairs[pairs[:, 0].argsort(), 1])
        self.preds = full

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


def examples(batch, pred: torch.Tensor, generation: str, limit: int = 4) -> list[dict[str, Any]]:
    """The first `limit` samples of a micro-batch as a person reads them: its first image (uint8
    H×W×3: the loader's pixel codes as they are, or float rows un-normalised), the prompt up to the
    answer (each image's pad run shown as `<image>`), the answer and the model's greedy answer at the
    same positions (`pred`: the argmax at every label position of the batch, as `GreedyMatch` keeps it)."""
    import numpy as np

    from data_pipelines import generations as data_generations
    from data_pipelines.schema import IGNORE_INDEX
    from data_pipelines.text import get_tokenizer
    from data_pipelines.vision import unpatchify, vision_spec

    tok, spec = get_tokenizer(None, generation), vision_spec(generation)
    data = data_generations.get(generation)
    table = data.special_tokens()
    image_pad = table[data.image_tokens[1]]  # the generation's pad ids (Qwen-VL, Qwen3.5 differ from Qwen2's)
    video_pad = -1 if data.video is None else table[data.video_tokens[1]]
    targets = torch.nonzero(batch.labels != IGNORE_INDEX).squeeze(1)
    cu = batch.cu_seqlens.tolist()
    media_rows = batch.grid_thw.reshape(-1, 3).prod(-1).tolist()
    row_start = [0] + list(np.cumsum(media_rows))
    ids = batch.input_ids.tolist()
    out = []
    for j in range(min(limit, batch.num_samples)):
        mine = (targets >= cu[j]) & (targets < cu[j + 1])
        if not bool(mine.any()):
            continue
        first = int(targets[mine][0])
        prompt, prev = [], None
        for i in ids[cu[j]:first + 1]:
            if i in (image_pad, video_pad):
                if prev != i:
                    prompt.append("<image>" if i == image_pad else "<video>")
            else:
                prompt.append(tok.decode([i]))
            prev = i
        image = None
        media_before = sum(1 for a, b in zip(ids[:cu[j]], ids[1:cu[j] + 1]) if b in (image_pad, video_pad) and a != b)
        if any(i in (image_pad, video_pad) for i in ids[cu[j]:cu[j + 1]]) and media_before < len(media_rows):
            k = media_before
            rows = batch.pixel_values[row_start[k]:row_start[k + 1]].cpu().numpy()
            frames = unpatchify(rows, batch.grid_thw.reshape(-1, 3)[k].tolist(), spec.patch_size,
                                spec.temporal_patch_size, spec.merge_size)
            if frames.dtype != np.uint8:  # normalised floats: undo the normalisation (the loader's codes are the pixels)
                mean, std = np.array(spec.mean).reshape(3, 1, 1), np.array(spec.std).reshape(3, 1, 1)
                frames = np.clip((frames.astype(np.float32) * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8)
            image = frames[0].transpose(1, 2, 0)
        out.append({
            "sample_id": batch.sample_ids[j], "image": image, "prompt": "".join(prompt),
            "answer": tok.decode(batch.labels[targets[mine]].tolist()),
            "model_answer": tok.decode(pred[mine.nonzero().squeeze(1)].tolist()),
        })
    return out


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

    def __init__(self, cfg: TrainConfig, dims, num_examples: int = 4) -> None:
        from data_pipelines.stream import StepLoader
        from qvl_train.monitor.flops import SampleFlops

        self.dims = dims
        self.generation, self.num_examples = cfg.data.generation, num_examples
        self.every = cfg.eval.every if cfg.data.valid else 0
        self.names = source_names(cfg.data.valid)
        self.loaders = [
            StepLoader(
                replace(cfg.data, sources=[replace(src, weight=1.0)], valid=[], plan_ahead=False),
                micro_batches_per_step=cfg.eval.max_batches, dp_rank=dims.dp_rank, dp_size=dims.dp,
                flop_model=SampleFlops(cfg.model),
            )
            for src in (cfg.data.valid if self.every else [])
        ]
        self.starts = [loader.state_dict() for loader in self.loaders]
        self.devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def maybe_log(self, engine, step: int, runlog) -> None:
        """When `due(step)` (all ranks): evaluate every source and report it through `runlog`
        (monitor/runlog.py) on rank 0 — a metrics.jsonl line with the examples as text,
        `eval/<source>/{loss,accuracy,label_tokens}` and an examples table in wandb, a log line."""
        if not self.due(step):
            return
        for record in self.run(engine, step):
            if not runlog.active:
                continue
            shown, name = record.pop("examples"), record["source"]
            runlog.write({**record, "examples": [{k: v for k, v in e.items() if k != "image"} for e in shown]})
            runlog.wandb.log({f"eval/{name}/{k}": record[k] for k in ("loss", "accuracy", "label_tokens")}, step=step)
            runlog.wandb.log_examples(f"eval/{name}/examples", shown, step=step)
            log.info("eval        step %d  %s  loss %.4f  exact match %.1f%% of %d",
                     step, name, record["loss"], 100 * record["accuracy"], record["answers"])

    def run(self, engine, step: int) -> list[dict[str, Any]]:
        records = []
        with torch.random.fork_rng(devices=self.devices):  # training's RNG stream stays as it was
            for name, loader, start in zip(self.names, self.loaders, self.starts):
                loader.load_state_dict(start)
                batches = loader.next_step()
                with GreedyMatch(engine.model, self.dims) as probe:
                    loss_sum, labels = engine.eval_step(batches)
                probe.collect(batches)
                exact, answered = self._global_counts(probe.count(batches))
                records.append({"kind": "eval", "step": step, "source": name,
                                "loss": loss_sum / max(labels, 1), "label_tokens": labels,
                                "accuracy": exact / max(answered, 1), "answers": answered,
                                "examples": self._examples(batches, probe.preds)})
        return records

    def _examples(self, batches: list, preds: list) -> list[dict[str, Any]]:
        """`examples` of this evaluation's first micro-batch, made where the logits are (data-parallel
        rank 0, last stage, tensor rank 0) and gathered to every rank (global rank 0 writes them)."""
        dims = self.dims
        mine = None
        if self.num_examples and dims.dp_rank == 0 and dims.is_last_stage and dims.tp_rank == 0 and preds:
            mine = examples(batches[0], preds[0], self.generation, self.num_examples)
        gathered: list = [None] * dims.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return next((g for g in gathered if g is not None), [])

    def _global_counts(self, local: tuple[int, int]) -> tuple[int, int]:
        """Sum over data-parallel ranks (counted where the logits are: last stage, tensor rank 0, context
        rank 0 — its predictions cover the whole rows after `GreedyMatch.collect`)."""
        dims = self.dims
        mine = local if dims.is_last_stage and dims.tp_rank == 0 and dims.cp_rank == 0 else (0, 0)
        counts = torch.tensor(mine, dtype=torch.float64, device=dims.device)
        torch.distributed.all_reduce(counts, group=dims.groups["world"])
        return int(counts[0]), int(counts[1])

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()
