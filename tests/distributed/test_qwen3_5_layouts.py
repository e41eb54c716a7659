"""Qwen3.5 trains the same in every layout: one step of the tiny Qwen3.5 (dense) and Qwen3.5-MoE — hybrid
LLMs of 3 Gated DeltaNet layers and 1 gated-attention layer — in a parallel layout against one process (fp32,
gloo on CPU): the same loss, grad norm, load-balancing loss and expert load, and every gradient (assembled at
its global shape from the model's own sharded state dict by `grad_probe.py`) within 1e-5 relative.

The layouts are combined into four 4-process launches (4 micro-batches of 512 tokens per step):

* dense, tp=2 + sp × dp=2 with the distributed optimizer: GDN key-head groups split over the tensor ranks
  (`in_proj` column-, `out_proj` row-parallel, conv / A_log / dt_bias sharded, the gated norm's weight
  replicated with its gradient summed over TP), the sequence gathered before and scattered after each mixer;
  the gradients read from megatron DDP's reduce-scattered buffers;
* dense, pp=2 vpp=2 × dp=2 (interleaved 1F1B, one layer per chunk: rank 0 holds layers [0] [2], rank 1
  [1] [3], the full-attention layer 3 in rank 1's second chunk; the hybrid pattern and the GDN init follow the
  global layer numbers), tied embeddings across the stages;
* MoE, tp=2 + sp × ep=2 with the distributed optimizer (routed experts split over two ranks, the shared
  expert and its sigmoid gate tensor-parallel);
* MoE, pp=2 × ep=2 × dp=2 at stage 3 (ViT frozen): the LLM and projector gradients equal the stage-2
  reference's (freezing the ViT changes no other gradient) and the ViT gets none.

Stage 1 (only the projector trains) is a single-process run against the same reference.
"""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_probe

PROBE = ROOT / "tests" / "distributed" / "grad_probe.py"
BASE = ["data.max_tokens=512", "train.global_batch_tokens=2048"]  # 4 micro-batches: the interleaved steady state
MODELS = {"dense": ["+experiment=tiny_qwen3_5", *BASE], "moe": ["+experiment=tiny_qwen3_5_moe", *BASE]}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("qwen3_5_ref")
    cache: dict[str, dict] = {}

    def get(model: str) -> dict:
        if model not in cache:
            cache[model] = run_probe(PROBE, tmp / f"{model}.pt", 1, str(data_root), *MODELS[model])
        return cache[model]

    return get


def _check(got: dict, ref: dict, name: str, trained: set[str]) -> None:
    """Loss, grad norm (over all trained parameters: only when they are the reference's), MoE aux loss
    and expert load, and every gradient of the `trained` keys within TOLERANCE relative; no other key."""
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), name
    if trained == set(ref["grads"]):
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=TOLERANCE), name
    if ref["moe_aux_loss"] is not None:
        assert ref["moe_aux_loss"] > 0 and got["moe_aux_loss"] == pytest.approx(ref["moe_aux_loss"], rel=TOLERANCE)
        assert len(ref["expert_load"]) == 4 and got["expert_load"] == ref["expert_load"], name
    assert set(got["grads"]) == trained, (name, sorted(set(got["grads"]) ^ trained)[:8])
    for key in sorted(trained):
        g, g_ref = got["grads"][key], ref["grads"][key]
        assert g.shape == g_ref.shape, (name, key)
        rel = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
        assert rel <= TOLERANCE, f"{name}: gradient of {key} differs by {rel:.2e} (relative)"


@pytest.mark.parametrize(
    "name, model, overrides, sp, frozen",
    [
        ("dense_tp2_sp_dp2_distopt", "dense", ["parallel.tp=2", "parallel.sp=true", "optim.distributed=true"], True, ()),
        ("dense_pp2_vpp2_dp2", "dense", ["parallel.pp=2", "parallel.vpp=2"], False, ()),
        ("moe_tp2_sp_ep2_distopt", "moe", ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "optim.distributed=true"],
         True, ()),
        ("moe_pp2_ep2_dp2_stage3", "moe", ["parallel.pp=2", "parallel.ep=2", "stage=stage3_sft"], False, ("vision.",)),
    ],
)
def test_layout_matches_one_process(tmp_path, data_root, references, name, model, overrides, sp, frozen):
    ref = references(model)
    assert any(".self_attention.A_log" in k for k in ref["grads"])  # Gated DeltaNet layers are in the model
    assert any(".self_attention.linear_qkv.weight" in k for k in ref["grads"])  # and a gated-attention layer
    if model == "moe":
        assert any(".shared_experts.gate_weight" in k for k in ref["grads"])
    got = run_probe(PROBE, tmp_path / f"{name}.pt", 4, str(data_root), *MODELS[model], *overrides)
    assert got["sequence_parallel"] == {"llm": sp, "vision": sp}
    _check(got, ref, name, {k for k in ref["grads"] if not k.startswith(frozen)})


def test_stage1_trains_only_the_projector(tmp_path, data_root, references):
    ref = references("dense")
    got = run_probe(PROBE, tmp_path / "stage1.pt", 1, str(data_root), *MODELS["dense"], "stage=stage1_align")
    _check(got, ref, "stage1", {k for k in ref["grads"] if k.startswith("projector.")})
