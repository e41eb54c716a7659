"""The interleaved pipeline schedule (parallel.pp=2 parallel.vpp=2: two model chunks per rank, layers
[0] [2] on rank 0 and [1] [3] on rank 1, embeddings tied across the ranks) computes the single-process
training step: the same losses over 6 optimizer steps within 1e-5 relative (fp32, 2 CPU processes),
with the engine's AdamW and with the distributed optimizer (one megatron DDP per chunk); the step-4
checkpoint resumes in one process with the single process' losses (checkpoint keys carry global layer
numbers, whatever the chunking). Gradients: see test_grad_equivalence.py."""

from __future__ import annotations

import pytest

from tests.distributed.test_layouts import _resume_from, _run

MODEL = ["model.llm.num_layers=4", "model.llm.tie_word_embeddings=true"]
INTERLEAVED = ["parallel.pp=2", "parallel.vpp=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    return _run(tmp_path_factory.mktemp("ref"), data_root, "single", 1, *MODEL)[1]


def _assert_same_losses(ref: list[dict], rows: list[dict], what: str) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref], what
    for a, b in zip(ref, rows):
        assert (a["tokens"], a["samples"]) == (b["tokens"], b["samples"]), (what, a["step"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"{what} step {a['step']}: {a['loss']} vs {b['loss']}"


def test_interleaved_matches_single_process_and_its_checkpoint_loads_at_pp1(tmp_path, data_root, reference):
    out, rows = _run(tmp_path, data_root, "pp2_vpp2", 2, *MODEL, *INTERLEAVED)
    _assert_same_losses(reference, rows, "pp=2 vpp=2")
    for a, b in zip(reference, rows):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    resumed = _resume_from(tmp_path, data_root, out, "vpp_to_pp1", 1, *MODEL)
    _assert_same_losses(reference[4:], resumed, "pp=2 vpp=2 checkpoint resumed in one process")


def test_interleaved_with_the_distributed_optimizer(tmp_path, data_root, reference):
    _, rows = _run(tmp_path, data_root, "pp2_vpp2_distopt", 2, *MODEL, *INTERLEAVED, "optim.distributed=true")
    _assert_same_losses(reference, rows, "pp=2 vpp=2 optim.distributed=true")
