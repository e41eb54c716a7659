"""Qwen3.5's MTP head (`model.mtp_loss_weight`, `models/mtp.py`) trains the same in a parallel layout as in one
process: one step of the tiny Qwen3.5 with `model.llm.mtp_num_layers=1 model.mtp_loss_weight=0.3` (fp32, gloo)
at tp=2 + sp × pp=2 — one 4-process launch: the head on the last stage with its column-parallel `fc`, the rows
split again for its sequence-parallel decoder layer, its token lookup in the last stage's tied copy of the
embedding (each TP rank its vocabulary rows) — against the one-process step: the LM loss, `loss/mtp`, the grad
norm and every gradient (embedding and MTP head included) within 1e-5 relative.
"""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_probe

PROBE = ROOT / "tests" / "distributed" / "grad_probe.py"
MTP = ["+experiment=tiny_qwen3_5", "data.max_tokens=512", "train.global_batch_tokens=1024",
       "model.llm.mtp_num_layers=1", "model.mtp_loss_weight=0.3"]
TOLERANCE = 1e-5


def test_mtp_tp2_sp_pp2_matches_one_process(tmp_path, data_root):
    ref = run_probe(PROBE, tmp_path / "ref.pt", 1, str(data_root), *MTP)
    got = run_probe(PROBE, tmp_path / "tp2_sp_pp2.pt", 4, str(data_root), *MTP,
                    "parallel.tp=2", "parallel.sp=true", "parallel.pp=2")
    assert ref["mtp_loss"] is not None and ref["mtp_loss"] > 0
    assert any(k.startswith("llm.mtp.layers.0.") for k in ref["grads"]) and "llm.mtp.fc.weight" in ref["grads"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["mtp_loss"] == pytest.approx(ref["mtp_loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=TOLERANCE)
    assert set(got["grads"]) == set(ref["grads"]), sorted(set(got["grads"]) ^ set(ref["grads"]))[:8]
    for key, g_ref in ref["grads"].items():
        g = got["grads"][key]
        rel = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
        assert rel <= TOLERANCE, f"gradient of {key} differs by {rel:.2e} (relative)"
