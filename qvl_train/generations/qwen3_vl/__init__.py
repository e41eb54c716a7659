"""Qwen3-VL dense (2B / 4B / 8B / 32B) and MoE (30B-A3B / 235B-A22B): SigLIP2-style ViT with a learned,
bilinearly interpolated position table (`models/vision/qwen3_vl.py`), DeepStack mergers, Qwen3 LLM
(q/k RMSNorm, head_dim 128, interleaved M-RoPE); the MoE LLM has routed experts in every layer
(megatron's MoELayer). HF: `Qwen3VL(Moe)ForConditionalGeneration`, nested `config.json`."""

from __future__ import annotations

from dataclasses import replace

from qvl_train.generations.base import QWEN2_GENERATION_CONFIG, ModelSpec, build_vlm

ARCHITECTURES = {False: "Qwen3VLForConditionalGeneration", True: "Qwen3VLMoeForConditionalGeneration"}


def config_from_hf(hf: dict):
    from qvl_train.config import LLMConfig, ModelConfig, VisionConfig

    t = {**hf, **(hf.get("text_config") or {})}
    v = hf["vision_config"]
    rope = t.get("rope_scaling") or {}
    llm = LLMConfig(
        num_layers=t["num_hidden_layers"], hidden_size=t["hidden_size"], ffn_hidden_size=t["intermediate_size"],
        num_attention_heads=t["num_attention_heads"], num_query_groups=t["num_key_value_heads"],
        head_dim=t.get("head_dim", 128), vocab_size=t["vocab_size"], rope_theta=float(t.get("rope_theta", 5e6)),
        mrope_section=list(rope.get("mrope_section", [24, 20, 20])), mrope_interleaved=True,
        norm_eps=float(t.get("rms_norm_eps", 1e-6)), qkv_bias=bool(t.get("attention_bias", False)), qk_norm=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
    )
    if v.get("out_hidden_size", llm.hidden_size) != llm.hidden_size:
        raise ValueError(f"vision_config.out_hidden_size={v['out_hidden_size']} differs from the LLM width {llm.hidden_size}")
    vision = VisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"], intermediate_size=v["intermediate_size"],
        norm="layernorm", mlp="gelu_tanh", patch_size=v.get("patch_size", 16), temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3), patch_bias=True,
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=list(v.get("deepstack_visual_indexes", [])),
    )
    name = hf.get("model_type", "qwen3_vl")
    if name == MOE_SPEC.hf_model_type:
        moe_from_hf(llm, t)
    return ModelConfig(generation=name, vision=vision, llm=llm)


def moe_from_hf(llm, t: dict) -> None:
    """Qwen3-VL-MoE `text_config` expert fields → `llm` (every layer sparse, top-k renormalised)."""
    if t.get("decoder_sparse_step", 1) != 1 or t.get("mlp_only_layers"):
        raise ValueError(
            "config.json: decoder_sparse_step != 1 or mlp_only_layers (dense layers between MoE layers) is not "
            "supported; every released Qwen3-VL-MoE model has experts in every layer"
        )
    if not t.get("norm_topk_prob", True):
        raise ValueError("config.json: norm_topk_prob=false is not supported (Qwen3-VL-MoE renormalises the top-k weights)")
    llm.num_experts = t["num_experts"]
    llm.moe_ffn_hidden_size = t["moe_intermediate_size"]
    llm.moe_router_topk = t["num_experts_per_tok"]
    llm.moe_aux_loss_coeff = float(t.get("router_aux_loss_coef", 0.001))


def hf_config(cfg, dtype: str) -> dict:
    """Qwen3-VL `config.json` in the released (nested) layout, transformers 4.57 field names."""
    from data_pipelines import generations as data_generations

    special = data_generations.get(cfg.generation).special_tokens()
    v, l = cfg.vision, cfg.llm
    moe = {
        "num_experts": l.num_experts, "moe_intermediate_size": l.moe_ffn_hidden_size,
        "num_experts_per_tok": l.moe_router_topk, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "router_aux_loss_coef": l.moe_aux_loss_coeff,
    } if l.num_experts else {}
    return {
        "architectures": [ARCHITECTURES[bool(l.num_experts)]],
        "model_type": cfg.generation,
        "image_token_id": cfg.image_pad_id, "video_token_id": cfg.video_pad_id,
        "vision_start_token_id": special["<|vision_start|>"], "vision_end_token_id": special["<|vision_end|>"],
        "tie_word_embeddings": l.tie_word_embeddings,
        "text_config": {
            "model_type": f"{cfg.generation}_text", "attention_bias": l.qkv_bias, "attention_dropout": 0.0, **moe,
            "bos_token_id": special["<|endoftext|>"], "eos_token_id": special["<|im_end|>"],
            "head_dim": l.head_dim or l.hidden_size // l.num_attention_heads,
            "hidden_act": "silu", "hidden_size": l.hidden_size, "initializer_range": 0.02,
            "intermediate_size": l.ffn_hidden_size, "max_position_embeddings": 262144,
            "num_attention_heads": l.num_attention_heads, "num_hidden_layers": l.num_layers,
            "num_key_value_heads": l.num_query_groups, "rms_norm_eps": l.norm_eps, "rope_theta": l.rope_theta,
            "rope_scaling": {"rope_type": "default", "mrope_section": list(l.mrope_section), "mrope_interleaved": True},
            "tie_word_embeddings": l.tie_word_embeddings, "dtype": dtype, "use_cache": True, "vocab_size": l.vocab_size,
        },
        "vision_config": {
            "model_type": cfg.generation, "depth": v.depth, "hidden_size": v.hidden_size, "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size, "out_hidden_size": l.hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "initializer_range": 0.02,
        },
        "torch_dtype": dtype,
    }


def hf_rules(cfg):
    from qvl_train.models.hf_convert import rules_qwen3_vl

    return rules_qwen3_vl(cfg)


SPEC = ModelSpec(
    name="qwen3_vl",
    build=build_vlm("qvl_train.models.vlm:Qwen3VLM"),
    hf_architecture=ARCHITECTURES[False],
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_rules=hf_rules,
    hf_generation_config=QWEN2_GENERATION_CONFIG,
    sizes=("2b", "4b", "8b", "32b"),
    hf_key_style="runtime",
)
MOE_SPEC = replace(
    SPEC, name="qwen3_vl_moe", hf_model_type="qwen3_vl_moe", hf_architecture=ARCHITECTURES[True],
    sizes=("30b_a3b", "235b_a22b"), experts=True,
)
"""The same model with megatron's MoELayer in every LLM layer (`model.llm.num_experts > 0`)."""
