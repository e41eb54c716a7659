"""Awkward micro-batches under every layout (edge_probe.py builds them): a data-parallel rank whose
micro-batches carry no image or video while the other rank's do, text-only and video-only packs, a
micro-batch without media between ones with media under pipeline parallelism. Each layout completes
the step (no hang: every rank reduces the same gradients) with the single-process loss and every
gradient within 1e-5 relative (MoE also with each expert split over tp=2, etp=2; also cp=2, pp=2 vpp=2,
the distributed optimizer and DeepSpeed ZeRO-3, where one rank skipping the ViT whose parameters the
other rank gathers would deadlock); at stage3_sft the frozen ViT gets no gradient and no optimizer state."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_probe

PROBE = ROOT / "tests" / "distributed" / "edge_probe.py"
DENSE, MOE = "+experiment=tiny_qwen3_vl", "+experiment=tiny_qwen3_vl_moe"


def _model_key(overrides) -> tuple:
    """The overrides that define the model (experiment, model.*): runs with the same key share a reference."""
    return tuple(o for o in overrides if o.startswith(("+experiment=", "model.")))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge_ref")

    class Lazy(dict):  # one single-process reference per model, computed when a case first needs it
        def __missing__(self, key):
            self[key] = run_probe(PROBE, tmp / f"ref{len(self)}.pt", 1, *key)
            return self[key]

    return Lazy()


def _assert_matches(got: dict, expected: dict, grads: str, label: str) -> None:
    """The probe's step against one process: visual tokens, loss, every gradient under `got[grads]` within 1e-5
    relative, the frozen ViT without gradients or optimizer state, and the stage-3 loss."""
    assert got["visual_tokens"] == expected["visual_tokens"] > 0
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert sorted(got[grads]) == sorted(expected[grads])
    for key, g_ref in expected[grads].items():
        rel = float((got[grads][key] - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
        assert rel <= 1e-5, f"{label}: gradient of {key} differs by {rel:.2e} (relative)"
    assert got["frozen"] > 0 and got["frozen_with_state"] == []
    assert got["sft_loss"] == pytest.approx(expected["sft_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "name, nproc, overrides",
    [
        ("tp2_sp_dp2", 4, [DENSE, "parallel.tp=2", "parallel.sp=true"]),
        ("pp2_dp2", 4, [DENSE, "parallel.pp=2", "parallel.first_stage_layers=2"]),
        ("moe_ep2_dp2", 2, [MOE, "parallel.ep=2"]),
        ("moe_tp2_sp_etp2", 2, [MOE, "parallel.tp=2", "parallel.sp=true", "parallel.etp=2"]),  # experts split by tp
        # the media-less micro-batch between media ones: split over context-parallel ranks, in an interleaved
        # pipeline (chunk 0 holds the ViT), and one data-parallel rank without media under the distributed optimizer
        ("cp2", 2, [DENSE, "parallel.cp=2"]),
        ("pp2_vpp2", 2, [DENSE, "model.llm.num_layers=6", "parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=4"]),
        ("distopt_dp2", 2, [DENSE, "optim.distributed=true"]),
    ],
)
def test_edge_micro_batches_match_one_process(tmp_path, references, name, nproc, overrides):
    expected = references[_model_key(overrides)]
    got = run_probe(PROBE, tmp_path / f"{name}.pt", nproc, *overrides)
    _assert_matches(got, expected, "grads", name)


def test_edge_micro_batches_deepspeed_zero3(tmp_path, references):
    """engine=deepspeed, ZeRO-3 over dp=2 (every parameter partitioned): rank 0's micro-batches carry no
    media, rank 1 runs the ViT twice; the step completes with the one-process loss and gradients."""
    overrides = [DENSE, "engine=deepspeed", "engine.zero_stage=3", "engine.param_persistence_threshold=0"]
    expected = references[_model_key(overrides)]
    got = run_probe(PROBE, tmp_path / "zero3.pt", 2, *overrides, timeout=300)
    _assert_matches(got, expected, "named_grads", "ZeRO-3")
