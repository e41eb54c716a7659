"""LoRA on Qwen3.5: adapters on the Gated DeltaNet projections (`in_proj`, `out_proj`: the default targets
include them), the gated-attention layer's qkv / proj, the MLPs and the projector.

1. tp=2 against one process (one 2-process launch of `grad_probe.py`, stage 3): the same loss and, after one
   step, every adapter gradient (B of the GDN `in_proj` split over the tensor ranks with the key-head groups of
   its weight, A of `out_proj` split on its columns) within 1e-5 relative; base weights get none.
2. Merge and export in one process: `merged_state_dict` loaded into the plain model gives the adapted model's
   logits, and the PEFT factors (`adapter_factors` → `hf_convert.lora_to_hf`) on HF's modules —
   `linear_attn.in_proj_qkv` / `in_proj_z` / `in_proj_b` / `in_proj_a` sharing A with their rows of B,
   `linear_attn.out_proj`, gated `q_proj` / `k_proj` / `v_proj` — rebuild exactly the merged HF weights
   (`W + alpha/r · B A`), and nothing else differs from the base.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.distributed.test_grad_equivalence import _probe

LORA = ["+experiment=tiny_qwen3_5", "data.max_tokens=512", "train.global_batch_tokens=1024", "model.lora.rank=4",
        "stage=stage3_sft"]


def test_qwen3_5_lora_tp2_matches_one_process(tmp_path, data_root):
    ref = _probe(tmp_path / "single.pt", data_root, 1, LORA)
    got = _probe(tmp_path / "tp2.pt", data_root, 2, [*LORA, "parallel.tp=2"])
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert set(got["grads"]) == set(ref["grads"])
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in ref["grads"]), "a frozen weight got a gradient"
    parts = (".self_attention.in_proj.", ".self_attention.out_proj.", ".self_attention.linear_qkv.", ".mlp.", "projector.")
    assert set(parts) <= {t for k in ref["grads"] for t in parts if t in k}
    for key, g in ref["grads"].items():
        assert float(g.norm()) > 0, f"{key}: a zero gradient proves nothing"
        err = float((got["grads"][key] - g).norm() / g.norm())
        assert err < 1e-5, (key, err)


def test_qwen3_5_lora_merge_and_adapter_export():
    from qvl_train.config import LoRAConfig, ParallelConfig
    from qvl_train.models import build_model, init_weights
    from qvl_train.models.hf_convert import lora_to_hf, ours_to_hf
    from qvl_train.models.lora import adapter_factors, is_lora_param, lora_layers, merged_state_dict
    from qvl_train.models.tiny import packed_batch
    from tests.conftest import megatron_one_rank_world
    from tests.unit.test_lora import _fill_b
    from tests.unit.test_model_params import load_model_config

    megatron_one_rank_world()
    cfg = load_model_config("qwen3_5/tiny")
    cfg.lora = LoRAConfig(rank=4, alpha=8.0)
    model = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True).eval()
    init_weights(model, seed=5, std=0.05)
    _fill_b(model, std=0.2)
    adapted = set(lora_layers(model))
    gdn_layers = [i for i, t in enumerate(cfg.llm.layer_types) if t == "linear_attention"]
    assert {f"llm.decoder.layers.{i}.self_attention.{p}" for i in gdn_layers for p in ("in_proj", "out_proj")} <= adapted

    batch = packed_batch(cfg)
    plain = build_model(replace(cfg, lora=LoRAConfig()), ParallelConfig(), pre_process=True, post_process=True).eval()
    merged = merged_state_dict(model)
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    base = {k: v for k, v in model.state_dict().items() if not (is_lora_param(k) or k.endswith("_extra_state"))}
    with torch.no_grad():
        want = model.logits(batch)[: batch.num_tokens]
        got = plain.logits(batch)[: batch.num_tokens]
        plain.load_state_dict(base, strict=False)
        unadapted = plain.logits(batch)[: batch.num_tokens]
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale  # fp32 rounding of W + s·B A against W x + s·B (A x)
    assert (unadapted - want).abs().max() > 1e-2 * scale  # the adapters change the logits: the check is sharp

    hf_merged, hf_base = (ours_to_hf(sd, cfg, style="runtime") for sd in (merged, base))
    adapters = lora_to_hf(adapter_factors(model), cfg)
    layer = f"model.language_model.layers.{gdn_layers[0]}.linear_attn."
    assert {layer + n for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")} <= set(adapters)
    for name, (a, b) in adapters.items():
        rebuilt = hf_base[f"{name}.weight"] + cfg.lora.scale * (b @ a)
        torch.testing.assert_close(rebuilt, hf_merged[f"{name}.weight"], rtol=1e-6, atol=1e-6, msg=name)
    changed = {k for k in hf_merged if not torch.equal(hf_merged[k], hf_base[k])}
    assert changed == {f"{name}.weight" for name in adapters}
