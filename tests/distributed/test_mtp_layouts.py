"""Qwen3.5's MTP head (`model.mtp_loss_weight`, `models/mtp.py`) trains the same in a parallel layout as in one
process: one step of the tiny Qwen3.5 with `model.llm.mtp_num_layers=1 model.mtp_loss_weight=0.3` (fp32, gloo)
at tp=2 + sp × pp=2 — one 4-process launch: the head on the last stage with its column-parallel `fc`, the rows
split again for its sequence-parallel decoder layer, its token lookup in the last stage's tied copy of the
embedding (each TP rank its vocabulary rows) — against the one-process step: the LM loss, `loss/mtp`, the grad
norm and every gradient (embedding and MTP head included) within 1e-5 relative. The MoE model's head (its decoder
layer a MoE layer: router in the load-balancing loss, experts sharded over ep) the same at tp=2 + sp × ep=2.
"""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_probe

PROBE = ROOT / "tests" / "distributed" / "grad_probe.py"
MTP = ["+experiment=tiny_qwen3_5", "data.max_tokens=512", "train.global_batch_tokens=1024",
       "model.llm.mtp_num_layers=1", "model.mtp_loss_weight=0.3"]
TOLERANCE = 1e-5


MOE = ["+experiment=tiny_qwen3_5_moe", *MTP[1:]]


@pytest.mark.parametrize("base, layout", [
    (MTP, ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2"]),
    (MOE, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]),
], ids=["dense_tp2_sp_pp2", "moe_tp2_sp_ep2"])
def test_mtp_layout_matches_one_process(tmp_path, data_root, base, layout):
    ref = run_probe(PROBE, tmp_path / "ref.pt", 1, str(data_root), *base)
    got = run_probe(PROBE, tmp_path / "layout.pt", 4, str(data_root), *base, *layout)
    assert ref["mtp_loss"] is not None and ref["mtp_loss"] > 0
    assert any(k.startswith("llm.mtp.layers.0.") for k in ref["grads"]) and "llm.mtp.fc.weight" in ref["grads"]
    if base is MOE:  # the head's router and experts got gradients (the aux loss's too)
        assert any(k.startswith("llm.mtp.layers.0.mlp.experts.") for k in ref["grads"])
        assert "llm.mtp.layers.0.mlp.router.weight" in ref["grads"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["mtp_loss"] == pytest.approx(ref["mtp_loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=TOLERANCE)
    assert set(got["grads"]) == set(ref["grads"]), sorted(set(got["grads"]) ^ set(ref["grads"]))[:8]
    for key, g_ref in ref["grads"].items():
        g = got["grads"][key]
        rel = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
        assert rel <= TOLERANCE, f"gradient of {key} differs by {rel:.2e} (relative)"
