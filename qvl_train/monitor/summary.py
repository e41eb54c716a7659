"""What a finished run did, from its metrics.jsonl:  python -m qvl_train.monitor.summary OUTPUT_DIR

Ends with the command that draws the run's curves (`launch/plot.py`, no wandb needed)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


def summarize(output_dir: str | Path, window: int = 10) -> str:
    out = Path(output_dir)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        return f"{out}: no training steps logged"
    head, tail = train[:window], train[-window:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    latest = (out / "checkpoints" / "latest")
    lines = [
        f"steps            {train[0]['step']}..{train[-1]['step']}",
        f"loss             {mean(head, 'loss'):.3f} (first {len(head)} steps) -> {mean(tail, 'loss'):.3f} (last {len(tail)})",
        f"tokens/s         {mean(tail, 'tokens_per_s'):,.0f}   step time {mean(tail, 'step_time_s'):.3f} s",
        f"packing          {mean(train, 'packing_efficiency'):.1%} of token slots hold real tokens",
        *io_lines(train),
        *data_wait_lines(train),
        f"metrics          {out / 'metrics.jsonl'}",
    ]
    evals = [r for r in rows if r.get("kind") == "eval"]
    for source in dict.fromkeys(r["source"] for r in evals):
        mine = [r for r in evals if r["source"] == source]
        first, last = mine[0], mine[-1]
        acc = (f", exact match {first['accuracy']:.1%} -> {last['accuracy']:.1%}"
               if first.get("accuracy") is not None and last.get("accuracy") is not None else "")
        label = f"held-out {source}"
        lines.insert(2, f"{label:<16} loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} "
                        f"(step {last['step']}){acc}")
    if latest.exists():
        lines.append(f"checkpoint       {out / 'checkpoints' / latest.read_text().strip()}")
    wandb_runs = sorted((out / "wandb").glob("offline-run-*")) if (out / "wandb").exists() else []
    if wandb_runs:
        lines.append(f"wandb (offline)  {wandb_runs[-1]}   upload: wandb sync {wandb_runs[-1]}")
    lines.append(f"plot             python launch/plot.py {shlex.quote(str(out))}   (writes {out / 'metrics.png'})")
    return "\n".join(lines)


def data_wait_lines(train: list[dict]) -> list[str]:
    """`data wait` — the share of step time the logged steps waited for their batches (slowest rank)."""
    rows = [r for r in train if "time/data_wait_s" in r]
    if not rows:
        return []
    wait, total = sum(r["time/data_wait_s"] for r in rows), sum(r["step_time_s"] for r in rows)
    share = wait / total if total > 0 else 0.0
    hint = "   (> 5%: raise data.num_workers / CPUs per task)" if share > 0.05 else ""
    return [f"data wait        {share:.1%} of step time waiting for batches ({wait:.1f} s over {len(rows)} logged steps){hint}"]


def io_lines(train: list[dict]) -> list[str]:
    """`data I/O` — bytes read from the shards / bytes of the samples used, over the logged steps."""
    rows = [r for r in train if r.get("data/bytes_used")]
    if not rows:
        return []
    read, used = sum(r["data/bytes_read"] for r in rows), sum(r["data/bytes_used"] for r in rows)
    return [f"data I/O         {read / used:.2f}x amplification: {read / 2**20:,.1f} MiB read for {used / 2**20:,.1f} MiB "
            f"of samples ({len(rows)} logged steps; > 1.05: add offsets, python -m data_pipelines.reindex)"]


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo"))
