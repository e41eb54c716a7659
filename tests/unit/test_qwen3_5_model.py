"""Qwen3.5 model-side rules that need no reference environment (fast): the registry's config mapping and checks,
the gated q/k/v layout, and the layouts refused before any process group starts (CP with Gated DeltaNet layers,
tp not dividing the GDN key heads). Parity with transformers 5.25: tests/parity/test_qwen3_5_parity.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qvl_train import generations
from qvl_train.config import ConfigError, ModelConfig, TrainConfig
from qvl_train.models.hf_convert import fuse_gated_qkv, split_gated_qkv
from tests.fixtures.qwen3_5_tokenizer import write_qwen3_5_tokenizer
from tests.unit.test_model_params import load_model_config


def test_config_json_layout_of_transformers_5():
    cfg = load_model_config("qwen3_5_moe/tiny")
    hf = generations.get("qwen3_5_moe").hf_config(cfg, "bfloat16")
    t = hf["text_config"]
    assert hf["architectures"] == ["Qwen3_5MoeForConditionalGeneration"] and hf["image_token_id"] == 248056
    assert t["rope_parameters"]["partial_rotary_factor"] == 0.25 and t["rope_parameters"]["mrope_section"] == [2, 1, 1]
    assert t["layer_types"][-1] == "full_attention" and t["shared_expert_intermediate_size"] == 32
    assert "deepstack_visual_indexes" not in hf["vision_config"]
    # released configs may leave layer_types out: HF's full_attention_interval rule (every 4th layer full)
    del t["layer_types"]
    back = generations.get("qwen3_5_moe").config_from_hf(hf)
    assert back.llm.layer_types == ["linear_attention"] * 3 + ["full_attention"] and back.llm == cfg.llm


def test_config_rules_name_the_key():
    cfg = load_model_config("qwen3_5/tiny")
    with pytest.raises(ConfigError, match="model.llm.layer_types must list 4 entries"):
        ModelConfig(generation="qwen3_5", vision=cfg.vision, llm=replace(cfg.llm, layer_types=["linear_attention"]))
    with pytest.raises(ConfigError, match="deepstack_visual_indexes must be"):
        ModelConfig(generation="qwen3_5", vision=replace(cfg.vision, deepstack_visual_indexes=[0]), llm=cfg.llm)
    with pytest.raises(ConfigError, match=r"head_dim·partial_rotary_factor/2 = 4"):
        ModelConfig(generation="qwen3_5", vision=cfg.vision, llm=replace(cfg.llm, mrope_section=[6, 5, 5]))


def test_gated_qkv_layout_round_trip():
    """HF q_proj rows [head, (query d | gate d)] → megatron's per-group [queries, gates, k, v] and back."""
    nh, ng, d, h = 4, 2, 3, 5
    q_gate, k, v = torch.randn(nh * 2 * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    fused = fuse_gated_qkv(q_gate, k, v, nh, ng)
    group0 = fused[: (2 * nh // ng + 2) * d]
    assert torch.equal(group0[:d], q_gate[:d]) and torch.equal(group0[d : 2 * d], q_gate[2 * d : 3 * d])  # queries 0, 1
    assert torch.equal(group0[2 * d : 3 * d], q_gate[d : 2 * d])  # then gate of head 0
    assert torch.equal(group0[4 * d : 5 * d], k[:d]) and torch.equal(group0[5 * d :], v[:d])
    assert all(torch.equal(a, b) for a, b in zip(split_gated_qkv(fused, nh, ng), (q_gate, k, v)))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_qwen3_5_tokenizer(str(tmp_path_factory.mktemp("q35tok")))


def _train_config(tok_dir) -> TrainConfig:
    cfg = TrainConfig()
    tiny = load_model_config("qwen3_5/tiny")
    cfg.model = ModelConfig(generation="qwen3_5", vision=tiny.vision, llm=tiny.llm)
    cfg.data.generation = "qwen3_5"
    cfg.data.tokenizer = tok_dir
    return cfg


def test_layouts_refused_before_process_groups(tok_dir):
    cfg = _train_config(tok_dir)
    cfg.validate(1)
    cfg.parallel.cp = 2
    with pytest.raises(ConfigError, match=r"parallel.cp=2: context parallelism is not implemented for Gated DeltaNet"):
        cfg.validate(2)
    cfg = _train_config(tok_dir)
    cfg.model.llm.linear_num_key_heads, cfg.model.llm.linear_num_value_heads = 1, 2
    cfg.parallel.tp = 2
    with pytest.raises(ConfigError, match="linear_num_key_heads=1 is not divisible by parallel.tp=2"):
        cfg.validate(2)
