"""A checkpoint written at tp=2 resumes in another layout: continuing at tp=2, resuming the same
step-4 checkpoint at pp=2 and at dp=2 give the same losses within 1e-5 (fp32, 2 CPU processes each)
and the same sample ids at every step after it."""

from __future__ import annotations

import shutil

import pytest

from tests.distributed.test_layouts import STEPS, _run, _step_ids

RESUME_AT = 4  # test_layouts' _run checkpoints every 4 steps


def _resume(tmp_path, data_root, ref_out, name, *layout):
    """Copy the step-4 checkpoint into a fresh output_dir and train it to STEPS in `layout`."""
    step = f"step_{RESUME_AT:07d}"
    out = tmp_path / name
    shutil.copytree(ref_out / "checkpoints" / step, out / "checkpoints" / step)
    (out / "checkpoints" / "latest").write_text(step + "\n")
    return _run(tmp_path, data_root, name, 2, *layout)


def test_tp2_checkpoint_resumes_at_pp2_and_dp2(tmp_path, data_root):
    ref_out, ref = _run(tmp_path, data_root, "tp2", 2, "parallel.tp=2")
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    want_ids = {s: ids for s, ids in _step_ids(sorted((ref_out / "data_trace").glob("dp*.jsonl"))).items()
                if s > RESUME_AT}
    for name, layout in (("pp2", ["parallel.pp=2"]), ("dp2", [])):
        out, rows = _resume(tmp_path, data_root, ref_out, name, *layout)
        assert [r["step"] for r in rows] == list(range(RESUME_AT + 1, STEPS + 1)), name
        for a, b in zip(ref[RESUME_AT:], rows):
            assert (a["samples"], a["tokens"]) == (b["samples"], b["tokens"]), (name, a["step"])
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), f"{name} step {a['step']}"
        traces = sorted((out / "data_trace").glob("dp*.jsonl"))
        assert len(traces) == (2 if name == "dp2" else 1)
        assert _step_ids(traces) == want_ids, name  # dp=2: the union of both ranks' micro-batches
