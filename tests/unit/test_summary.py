"""`python -m qvl_train.monitor.summary OUTPUT_DIR`: the run in a few lines, ending with the command that
plots it (`launch/plot.py`), which runs as printed."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from qvl_train.monitor.summary import summarize
from tests.conftest import ROOT


def test_summary_prints_the_plot_command_and_it_runs(tmp_path):
    out = tmp_path / "my run"
    out.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 5.0 / s, "tokens_per_s": 1000.0, "step_time_s": 0.5,
             "packing_efficiency": 0.9, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 6)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = summarize(out)
    plot = [line for line in text.splitlines() if line.startswith("plot")]
    assert len(plot) == 1 and "launch/plot.py" in plot[0], text
    cmd = shlex.split(plot[0].split(None, 1)[1].split("   (")[0])
    assert cmd[:2] == ["python", "launch/plot.py"] and cmd[2:] == [str(out)]
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "metrics.png").stat().st_size > 0
