"""Every layout computes the single-process gradient: after one step, every gradient (assembled to its
full shape from the model's own sharded state dict, see grad_probe.py) is within 1e-5 relative of the
one-process run, for the models where tensor parallelism has the most to get wrong — Qwen3-VL
(DeepStack mergers, q/k norms, embeddings tied across pipeline stages) and Qwen2.5-VL (window-ordered ViT) — at tp=2,
tp=2 with sequence parallelism (LLM and ViT), tp=2 × dp=2 with sequence parallelism, pp=2, tp=2 × pp=2, context
parallel cp=2, tp=2 × cp=2 with sequence parallelism and cp=2 × pp=2, the tiny Qwen3-VL MoE at cp=2 × ep=2
(also its load-balancing loss and expert load, padding rows left out of both), and the
interleaved schedule pp=2 vpp=2 (Qwen3-VL with 6 LLM layers, 4 on the first stage so that chunk 0
holds both DeepStack layers: rank 0 [0 1] [3 4], rank 1 [2] [5]; 4 micro-batches, so the schedule
reaches its steady state where activations and gradients cross between the ranks at once), alone
and with cp=2."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_probe

PROBE = ROOT / "tests" / "distributed" / "grad_probe.py"
BASE = ["data.max_tokens=512", "train.global_batch_tokens=1024"]
QWEN3 = ["+experiment=tiny_qwen3_vl", *BASE]
QWEN25 = ["+experiment=tiny_qwen2_5_vl", *BASE]
MOE = ["+experiment=tiny_qwen3_vl_moe", *BASE]
QWEN3_6L = ["+experiment=tiny_qwen3_vl", "data.max_tokens=512", "train.global_batch_tokens=2048", "model.llm.num_layers=6"]


def _probe(out, data_root, nproc: int, overrides: list[str]) -> dict:
    return run_probe(PROBE, out, nproc, str(data_root), *overrides)


REFERENCES = {"qwen3": QWEN3, "qwen2_5": QWEN25, "qwen3_6l": QWEN3_6L, "qwen3_moe": MOE}
_computed: dict[str, dict] = {}


def reference(name: str, data_root, tmp_dir) -> dict:
    """The one-process probe result of `REFERENCES[name]`, run once per test session (other suites that
    compare with the same one-process step, e.g. the MoE one with `MOE`, can take it from here)."""
    if name not in _computed:
        _computed[name] = _probe(tmp_dir / f"reference_{name}.pt", data_root, 1, REFERENCES[name])
    return _computed[name]


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("grad_ref")

    class Lazy(dict):  # only the references the selected cases use
        def __missing__(self, name):
            return reference(name, data_root, tmp)

    return Lazy()


@pytest.mark.parametrize(
    "name, ref, nproc, overrides, sp",
    [
        ("qwen3_tp2", "qwen3", 2, [*QWEN3, "parallel.tp=2"], False),
        ("qwen3_tp2_sp_dp2", "qwen3", 4, [*QWEN3, "parallel.tp=2", "parallel.sp=true"], True),
        # tied embeddings across stages: the last stage's output weight is a copy of stage 0's embedding
        ("qwen3_pp2", "qwen3", 2, [*QWEN3, "parallel.pp=2", "parallel.first_stage_layers=2"], False),
        ("qwen3_tp2_pp2", "qwen3", 4, [*QWEN3, "parallel.tp=2", "parallel.pp=2", "parallel.first_stage_layers=2"], False),
        ("qwen2_5_tp2_sp", "qwen2_5", 2, [*QWEN25, "parallel.tp=2", "parallel.sp=true"], True),
        # context parallel: zigzag split, K/V all-gather, ViT shared over CP ranks, DeepStack features split
        ("qwen3_cp2", "qwen3", 2, [*QWEN3, "parallel.cp=2"], False),
        ("qwen2_5_tp2_sp_cp2", "qwen2_5", 4, [*QWEN25, "parallel.tp=2", "parallel.sp=true", "parallel.cp=2"], True),
        # cp × pp: both micro-batches padded to the step's largest zigzag share; DeepStack on stage 0, tied embeddings
        ("qwen3_cp2_pp2", "qwen3", 4, [*QWEN3, "parallel.cp=2", "parallel.pp=2", "parallel.first_stage_layers=2"], False),
        # cp × MoE: each CP rank routes its share through experts split over the same two ranks (ep=2)
        ("qwen3_moe_cp2_ep2", "qwen3_moe", 2, [*MOE, "parallel.cp=2", "parallel.ep=2"], False),
        # interleaved 1F1B, uneven: chunks [0 1] [3 4] on rank 0, [2] [5] on rank 1; tied embeddings
        ("qwen3_pp2_vpp2", "qwen3_6l", 2, [*QWEN3_6L, "parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=4"], False),
        # the same chunks with every micro-batch of the step padded to its largest zigzag share (4 of them)
        ("qwen3_cp2_pp2_vpp2", "qwen3_6l", 4,
         [*QWEN3_6L, "parallel.cp=2", "parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=4"], False),
    ],
)
def test_gradients_match_one_process(tmp_path, data_root, references, name, ref, nproc, overrides, sp):
    expected = references[ref]
    got = _probe(tmp_path / f"{name}.pt", data_root, nproc, overrides)
    assert got["sequence_parallel"] == {"llm": sp, "vision": sp}
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    if expected["moe_aux_loss"] is not None:  # the load-balancing loss and the routed tokens per expert of the sequence
        assert expected["moe_aux_loss"] > 0 and got["moe_aux_loss"] == pytest.approx(expected["moe_aux_loss"], rel=1e-5)
        assert got["expert_load"] == expected["expert_load"] and sum(expected["expert_load"][0]) > 0
    assert sorted(got["grads"]) == sorted(expected["grads"])
    for key, g_ref in expected["grads"].items():
        g = got["grads"][key]
        assert g.shape == g_ref.shape, key
        rel = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
        assert rel <= 1e-5, f"{name}: gradient of {key} differs by {rel:.2e} (relative)"
