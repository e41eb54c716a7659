"""Qwen2.5-VL (3B / 7B / 32B / 72B): window-attention ViT with a few full-attention blocks, RMSNorm +
SwiGLU (`models/vision/qwen2_5_vl.py`), absolute-time M-RoPE for video. HF:
`Qwen2_5_VLForConditionalGeneration`, flat `config.json`."""

from __future__ import annotations

from qvl_train.generations.base import (
    QWEN2_GENERATION_CONFIG,
    ModelSpec,
    build_vlm,
    qwen2_hf_config,
    qwen2_llm_from_hf,
    qwen2_vision_common,
)

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


def config_from_hf(hf: dict):
    from qvl_train.config import ModelConfig, VisionConfig

    t = {**hf, **(hf.get("text_config") or {})}
    v = hf["vision_config"]
    llm = qwen2_llm_from_hf(t, hf)
    out = v.get("out_hidden_size", llm.hidden_size)
    if out != llm.hidden_size:
        raise ValueError(f"vision_config.out_hidden_size={out} differs from the LLM width {llm.hidden_size}")
    vision = VisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], norm="rmsnorm", mlp="swiglu",
        window_size=v.get("window_size", 112), fullatt_block_indexes=list(v.get("fullatt_block_indexes", [])),
        tokens_per_second=int(v.get("tokens_per_second", 2)), **qwen2_vision_common(v),
    )
    return ModelConfig(generation="qwen2_5_vl", vision=vision, llm=llm)


def hf_config(cfg, dtype: str) -> dict:
    v, l = cfg.vision, cfg.llm
    vision = dict(
        depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
        in_chans=v.in_channels, out_hidden_size=l.hidden_size, hidden_act="silu", patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
        window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
        tokens_per_second=v.tokens_per_second,
    )
    return qwen2_hf_config(cfg, dtype, ARCHITECTURE, vision, max_position_embeddings=128000)


def hf_rules(cfg):
    from qvl_train.models.hf_convert import rules_dynamic_vit

    return rules_dynamic_vit(cfg)


SPEC = ModelSpec(
    name="qwen2_5_vl",
    build=build_vlm("qvl_train.models.vlm:VLM", "qvl_train.models.vision.qwen2_5_vl:Qwen2_5VisionTransformer"),
    hf_architecture=ARCHITECTURE,
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_rules=hf_rules,
    hf_generation_config=QWEN2_GENERATION_CONFIG,
    sizes=("3b", "7b", "32b", "72b"),
)
