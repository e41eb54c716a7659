"""Qwen2-VL (2B / 7B / 72B): ViT with 2-D RoPE and QuickGELU MLP (`models/vision/qwen2_vl.py`), 2×2 patch
merger, Qwen2 LLM with M-RoPE. HF: `Qwen2VLForConditionalGeneration`, flat `config.json`."""

from __future__ import annotations

from qvl_train.generations.base import (
    QWEN2_GENERATION_CONFIG,
    ModelSpec,
    build_vlm,
    qwen2_hf_config,
    qwen2_llm_from_hf,
    qwen2_vision_common,
)

ARCHITECTURE = "Qwen2VLForConditionalGeneration"


def config_from_hf(hf: dict):
    from qvl_train.config import ModelConfig, VisionConfig

    t = {**hf, **(hf.get("text_config") or {})}
    v = hf["vision_config"]
    vision = VisionConfig(hidden_size=v["embed_dim"], mlp_ratio=float(v.get("mlp_ratio", 4.0)), **qwen2_vision_common(v))
    return ModelConfig(generation="qwen2_vl", vision=vision, llm=qwen2_llm_from_hf(t, hf))


def hf_config(cfg, dtype: str) -> dict:
    v, l = cfg.vision, cfg.llm
    vision = dict(
        depth=v.depth, embed_dim=v.hidden_size, mlp_ratio=v.mlp_ratio, num_heads=v.num_heads, in_chans=v.in_channels,
        hidden_size=l.hidden_size, hidden_act="quick_gelu", patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
    )
    return qwen2_hf_config(cfg, dtype, ARCHITECTURE, vision, max_position_embeddings=32768)


def hf_rules(cfg):
    from qvl_train.models.hf_convert import rules_dynamic_vit

    return rules_dynamic_vit(cfg)


SPEC = ModelSpec(
    name="qwen2_vl",
    build=build_vlm("qvl_train.models.vlm:VLM", "qvl_train.models.vision.qwen2_vl:Qwen2VisionTransformer"),
    hf_architecture=ARCHITECTURE,
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_rules=hf_rules,
    hf_generation_config=QWEN2_GENERATION_CONFIG,
    sizes=("2b", "7b", "72b"),
)
