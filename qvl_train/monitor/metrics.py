"""`metrics.jsonl` and the live progress line, both written by global rank 0 only.

One JSON object per line, flushed at every logged step, so `tail -f` and a crashed run both show
everything up to the last step. Schema: README ("metrics.jsonl").
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

GiB = float(1 << 30)


def memory_stats() -> dict[str, float]:
    """`mem/rss_gb` of this process and, on a GPU, `mem/peak_allocated_gb` since the last call (GiB)."""
    import psutil
    import torch

    stats = {"mem/rss_gb": psutil.Process().memory_info().rss / GiB}
    if torch.cuda.is_available():
        stats["mem/peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GiB
        torch.cuda.reset_peak_memory_stats()
    return stats


def train_record(
    step: int, result, *, lr: float, step_time_s: float, data_s: float, checkpoint_s: float,
    world_size: int, peak_tflops: Optional[float], skipped_steps: int,
) -> dict[str, Any]:
    """One `"kind": "train"` line of metrics.jsonl from the engine's `StepResult` (schema: README).

    `lr` is the rate the caller read from the optimizer; the step's per-module rates
    (`result.lrs`) replace it with the LLM's and add the ViT's / projector's where they differ.
    """
    tflops = result.flops / max(step_time_s, 1e-9) / world_size / 1e12  # model TFLOP/s per device
    record: dict[str, Any] = {
        "kind": "train", "step": step, "loss": result.loss, "lm_loss": result.loss,
        "grad_norm": result.grad_norm, "lr": lr, "tokens": result.tokens, "samples": result.samples,
        "packing_efficiency": result.tokens / max(result.slots, 1),
        "tokens_per_s": result.tokens / step_time_s, "samples_per_s": result.samples / step_time_s,
        "step_time_s": step_time_s, "tflops_per_s": tflops,
        **{f"grad_norm/{m}": v for m, v in result.module_grad_norms.items()},
        "label_tokens": result.label_tokens, "visual_tokens": result.visual_tokens,
        "visual_token_share": result.visual_tokens / max(result.tokens, 1),
        "dp_imbalance": result.dp_imbalance,
        "data_wait_s": data_s, "time/data_s": data_s,
        **{f"time/{k}": v for k, v in result.timings.items()},
        "time/checkpoint_s": checkpoint_s,
        "skipped_step": int(result.skipped), "skipped_steps": skipped_steps,
        **memory_stats(),
    }
    if peak_tflops:
        record["mfu"] = tflops / peak_tflops
    record.update(lr_record(lr, getattr(result, "lrs", None) or {}))
    record.update(moe_record(result))
    if getattr(result, "mtp_loss", None) is not None:  # Qwen3.5's MTP head (model.mtp_loss_weight > 0)
        record["loss/mtp"] = result.mtp_loss
    return record


EXPERT_LOAD_PREFIX = "moe/expert_load/layer_"
"""metrics.jsonl: routed tokens per expert of one layer (a list); wandb: a histogram over expert ids."""


def moe_record(result) -> dict[str, Any]:
    """MoE models: `loss/moe_aux` (the load-balancing loss, apart from the LM loss) and the expert load."""
    if getattr(result, "moe_aux_loss", None) is None:
        return {}
    record: dict[str, Any] = {"loss/moe_aux": result.moe_aux_loss}
    record.update({f"{EXPERT_LOAD_PREFIX}{i}": load for i, load in result.expert_load.items()})
    return record


def lr_record(lr: float, module_lrs: dict[str, float]) -> dict[str, float]:
    """`lr` (the LLM's) plus `lr/vision`, `lr/projector` where a module's rate differs from it."""
    llm = module_lrs.get("llm", lr)
    out = {"lr": llm}
    for module in ("vision", "projector"):
        if module in module_lrs and module_lrs[module] != llm:
            out[f"lr/{module}"] = module_lrs[module]
    return out


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the lines of a JSON-lines file whose `step` is past `last_step` (and unreadable lines).

    A resumed run appends from its checkpoint's step; what the interrupted run wrote after it is gone.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, AttributeError):
            continue
    path.write_text("".join(kept))


class MetricsWriter:
    """Appends `{"kind": ..., ...}` lines; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: str | Path, *, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, resume_step)  # keep history up to the checkpoint we resumed from
        self._f: Optional[TextIO] = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        assert self._f is not None
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """A live line: step, loss, tokens/s, ETA. Rewritten in place on a terminal, one line per step in logs."""

    def __init__(self, total_steps: int, start_step: int, stream: TextIO = sys.stdout) -> None:
        self.total, self.start = total_steps, start_step
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float, step_time_s: float) -> None:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        line = (
            f"step {step:>6}/{self.total} | loss {loss:7.4f} | {tokens_per_s:9,.0f} tok/s | "
            f"{step_time_s:6.3f} s/step | ETA {_fmt_duration(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line)
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
