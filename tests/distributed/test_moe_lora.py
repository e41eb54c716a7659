"""LoRA on a mixture-of-experts model under expert parallelism: tiny Qwen3-VL-MoE with adapters on
attention, on every routed expert (each its own A and B) and on the projector, at ep=2 (experts 0-1 on
rank 0, 2-3 on rank 1) against one process — the same loss, and after one step every adapter gradient,
assembled from the sharded state dict, within 1e-5 relative; base weights and routers get none."""

from __future__ import annotations

import pytest

from tests.distributed.test_grad_equivalence import _probe

MOE_LORA = ["+experiment=tiny_qwen3_vl_moe", "data.max_tokens=512", "train.global_batch_tokens=1024",
            "model.lora.rank=4", "stage=stage3_sft", "model.llm.num_layers=3"]  # 3: DeepStack layer 1 feeds a later layer


def test_moe_lora_expert_parallel_matches_one_process(tmp_path, data_root):
    ref = _probe(tmp_path / "single.pt", data_root, 1, MOE_LORA)
    got = _probe(tmp_path / "ep2.pt", data_root, 2, [*MOE_LORA, "parallel.ep=2"])
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert set(got["grads"]) == set(ref["grads"])
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in ref["grads"]), "a frozen weight got a gradient"
    parts = (".experts.", ".self_attention.", "projector.")
    assert set(parts) <= {t for k in ref["grads"] for t in parts if t in k}
    for key, g in ref["grads"].items():
        assert float(g.norm()) > 0, f"{key}: a zero gradient proves nothing"
        err = float((got["grads"][key] - g).norm() / g.norm())
        assert err < 1e-5, (key, err)
