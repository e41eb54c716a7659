"""Training curves for people without wandb:  python launch/plot.py OUTPUT_DIR [--out PNG]

Reads OUTPUT_DIR/metrics.jsonl and draws one PNG (default OUTPUT_DIR/metrics.png) with a panel each
for loss (train, plus held-out loss per source from `"kind": "eval"` lines), held-out exact-match
accuracy (when evaluated), tokens/s, MFU (when the
run reported it: on GPUs with a known peak or `train.peak_tflops`), learning rate and gradient norm
(total and per module). Uses matplotlib's Agg backend, so it runs on a login node without a display.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of a metrics.jsonl; raises SystemExit with a fix when there are none."""
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; give the output_dir of a run (it holds metrics.jsonl)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        raise SystemExit(f"{path} has no training steps yet; plot again once the run has logged a step")
    return train, [r for r in rows if r.get("kind") == "eval"]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def panels(train: list[dict], evals: list[dict]) -> list[tuple[str, list[tuple[str, list, list]]]]:
    """[(title, [(label, steps, values), ...]), ...]: what each panel draws; empty panels left out."""
    loss = [("train", *_series(train, "loss"))]
    sources = sorted({r["source"] for r in evals})
    by_source = {s: [r for r in evals if r["source"] == s] for s in sources}
    loss += [(f"eval {s}", *_series(by_source[s], "loss")) for s in sources]
    modules = sorted(k for k in train[-1] if k.startswith("grad_norm/"))
    out = [
        ("loss", loss),
        ("held-out exact match (greedy)", [(f"eval {s}", *_series(by_source[s], "accuracy")) for s in sources]),
        ("tokens / s", [("tokens/s", *_series(train, "tokens_per_s"))]),
        ("MFU", [("mfu", *_series(train, "mfu"))]),
        ("learning rate", [("lr", *_series(train, "lr"))]),
        ("gradient norm", [("total", *_series(train, "grad_norm"))]
         + [(k.split("/", 1)[1], *_series(train, k)) for k in modules]),
    ]
    return [(title, [c for c in curves if c[1]]) for title, curves in out if any(c[1] for c in curves)]


def plot(output_dir: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_rows(output_dir / "metrics.jsonl")
    drawn = panels(train, evals)
    fig, axes = plt.subplots(len(drawn), 1, figsize=(9, 2.6 * len(drawn)), sharex=True, squeeze=False)
    for ax, (title, curves) in zip(axes[:, 0], drawn):
        for label, steps, values in curves:
            ax.plot(steps, values, label=label, marker="o" if label.startswith("eval") else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(output_dir), fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="a run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default OUTPUT_DIR/metrics.png)")
    args = parser.parse_args(argv)
    print(plot(args.output_dir, args.out or args.output_dir / "metrics.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
