"""launch/plot.py: metrics.jsonl → one PNG; a clear error when there is nothing to plot."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plot(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "plot.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metrics_become_a_png(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 5.0 / s, "tokens_per_s": 1000.0 + s, "mfu": 0.3,
             "lr": 1e-3 * s, "grad_norm": 1.0 / s, "grad_norm/llm": 0.5 / s, "grad_norm/vision": 0.2 / s}
            for s in range(1, 11)]
    rows += [{"kind": "eval", "step": s, "source": src, "loss": 4.0 / s, "label_tokens": 100, "accuracy": s / 20}
             for s in (5, 10) for src in ("synth", "other")]
    _write(tmp_path / "run" / "metrics.jsonl", rows)
    (tmp_path / "run" / "metrics.jsonl").open("a").write('{"kind": "train", "st')  # a line cut by a crash
    png = tmp_path / "plots" / "curves.png"
    proc = _plot(tmp_path / "run", "--out", png)
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000  # six panels of curves, not an empty canvas

    sys.path.insert(0, str(ROOT / "launch"))
    try:
        from plot import panels, read_rows
    finally:
        sys.path.pop(0)
    train, evals = read_rows(tmp_path / "run" / "metrics.jsonl")
    drawn = dict(panels(train, evals))
    assert list(drawn) == ["loss", "held-out exact match (greedy)", "tokens / s", "MFU", "learning rate",
                           "gradient norm"]
    assert [c[0] for c in drawn["loss"]] == ["train", "eval other", "eval synth"]
    assert [c[0] for c in drawn["gradient norm"]] == ["total", "llm", "vision"]
    del train[-1]["mfu"]
    assert "MFU" in dict(panels(train, evals))  # one step with MFU is enough to draw it
    assert "MFU" not in dict(panels([{k: v for k, v in r.items() if k != "mfu"} for r in train], evals))
    assert list(dict(panels(train, []))) == ["loss", "tokens / s", "MFU", "learning rate", "gradient norm"]


def test_missing_or_empty_metrics_is_a_clear_error(tmp_path):
    proc = _plot(tmp_path / "nowhere")
    assert proc.returncode != 0 and "metrics.jsonl does not exist" in proc.stderr, proc.stderr
    _write(tmp_path / "empty" / "metrics.jsonl", [])
    proc = _plot(tmp_path / "empty")
    assert proc.returncode != 0 and "no training steps yet" in proc.stderr, proc.stderr
    assert not (tmp_path / "empty" / "metrics.png").exists()
