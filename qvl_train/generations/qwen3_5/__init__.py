"""Qwen3.5 / Qwen3.6 dense (0.8B … 27B) and MoE (35B-A3B … 397B-A17B): Qwen3-VL's ViT without DeepStack,
and the Qwen3-Next hybrid LLM — per layer a Gated DeltaNet (`linear_attention`) or a gated full attention
(`full_attention`: q_proj emits query and a per-channel output gate, q/k RMSNorm, partial rotary 0.25 with
interleaved M-RoPE), a SwiGLU MLP or routed experts plus a sigmoid-gated shared expert, vocabulary 248,320.
HF: `Qwen3_5(Moe)ForConditionalGeneration` (transformers ≥ 5.2; the reference is 5.25 in `.venv-ref`),
nested `config.json` (`text_config` with `rope_parameters`, `vision_config`), runtime key spelling
(`model.language_model.*`, `model.visual.*`). Model: `models/vlm.py:Qwen3_5VLM`; weights:
`models/hf_convert.py:rules_qwen3_5`. Source: transformers 5.25 `models/qwen3_5/configuration_qwen3_5.py`,
`models/qwen3_5_moe/configuration_qwen3_5_moe.py`."""

from __future__ import annotations

from dataclasses import replace

from qvl_train.generations.base import ModelSpec, build_vlm

ARCHITECTURES = {False: "Qwen3_5ForConditionalGeneration", True: "Qwen3_5MoeForConditionalGeneration"}
LAYER_TYPES = ("linear_attention", "full_attention")


def config_from_hf(hf: dict):
    """5.25 `Qwen3_5Config` / `Qwen3_5MoeConfig` (`config.json`) → ModelConfig."""
    from qvl_train.config import LLMConfig, ModelConfig, VisionConfig

    t = {**hf, **(hf.get("text_config") or {})}
    v = hf["vision_config"]
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    n = t["num_hidden_layers"]
    interval = t.get("full_attention_interval", 4)
    layer_types = list(t.get("layer_types") or
                       ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)])
    bad = sorted(set(layer_types) - set(LAYER_TYPES))
    if len(layer_types) != n or bad:
        raise ValueError(f"config.json: text_config.layer_types must list {n} entries of {', '.join(LAYER_TYPES)}; "
                         f"got {len(layer_types)} entries{', unknown ' + str(bad) if bad else ''}")
    llm = LLMConfig(
        num_layers=n, hidden_size=t["hidden_size"], ffn_hidden_size=t.get("intermediate_size", 0) or 0,
        num_attention_heads=t["num_attention_heads"], num_query_groups=t["num_key_value_heads"],
        head_dim=t.get("head_dim", 256), vocab_size=t["vocab_size"], rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1e7))),
        mrope_section=list(rope.get("mrope_section", [11, 11, 10])), mrope_interleaved=True,
        norm_eps=float(t.get("rms_norm_eps", 1e-6)), qkv_bias=bool(t.get("attention_bias", False)), qk_norm=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        layer_types=layer_types, linear_num_key_heads=t["linear_num_key_heads"],
        linear_num_value_heads=t["linear_num_value_heads"], linear_key_head_dim=t["linear_key_head_dim"],
        linear_value_head_dim=t["linear_value_head_dim"], linear_conv_kernel_dim=t.get("linear_conv_kernel_dim", 4),
        attn_output_gate=True, partial_rotary_factor=float(rope.get("partial_rotary_factor", t.get("partial_rotary_factor", 0.25))),
        mtp_num_layers=int(t.get("mtp_num_hidden_layers", 0)),
    )
    if v.get("out_hidden_size", llm.hidden_size) != llm.hidden_size:
        raise ValueError(f"vision_config.out_hidden_size={v['out_hidden_size']} differs from the LLM width {llm.hidden_size}")
    vision = VisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"], intermediate_size=v["intermediate_size"],
        norm="layernorm", mlp="gelu_tanh", patch_size=v.get("patch_size", 16), temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3), patch_bias=True,
        num_position_embeddings=v.get("num_position_embeddings", 2304), deepstack_visual_indexes=[],
    )
    name = hf.get("model_type", "qwen3_5")
    if name == MOE_SPEC.hf_model_type:
        llm.num_experts = t["num_experts"]
        llm.moe_ffn_hidden_size = t["moe_intermediate_size"]
        llm.moe_router_topk = t["num_experts_per_tok"]
        llm.moe_aux_loss_coeff = float(t.get("router_aux_loss_coef", 0.001))
        llm.shared_expert_ffn_hidden_size = int(t.get("shared_expert_intermediate_size", 0) or 0)
    # the checkpoint's MTP head (mtp.*; dense or MoE) is built and carried through import → export
    mtp_head = llm.mtp_num_layers == 1
    return ModelConfig(generation=name, vision=vision, llm=llm, mtp_head=mtp_head)


def hf_config(cfg, dtype: str) -> dict:
    """`config.json` in the 5.25 layout (`Qwen3_5Config` / `Qwen3_5MoeConfig`, `rope_parameters`)."""
    from data_pipelines import generations as data_generations
    from qvl_train.models.mtp import mtp_layers_built

    special = data_generations.get(cfg.generation).special_tokens()
    v, l = cfg.vision, cfg.llm
    moe = {
        "num_experts": l.num_experts, "moe_intermediate_size": l.moe_ffn_hidden_size,
        "num_experts_per_tok": l.moe_router_topk, "shared_expert_intermediate_size": l.shared_expert_ffn_hidden_size,
        "router_aux_loss_coef": l.moe_aux_loss_coeff, "output_router_logits": False,
    } if l.num_experts else {}
    return {
        "architectures": [ARCHITECTURES[bool(l.num_experts)]],
        "model_type": cfg.generation,
        "image_token_id": cfg.image_pad_id, "video_token_id": cfg.video_pad_id,
        "vision_start_token_id": special["<|vision_start|>"], "vision_end_token_id": special["<|vision_end|>"],
        "tie_word_embeddings": l.tie_word_embeddings,
        "text_config": {
            "model_type": f"{cfg.generation}_text", "attention_bias": l.qkv_bias, "attention_dropout": 0.0, **moe,
            "intermediate_size": l.ffn_hidden_size,  # MoE: unused by HF (its dense-MLP width), kept for the round trip
            "bos_token_id": special["<|endoftext|>"], "eos_token_id": special["<|im_end|>"],
            "head_dim": l.head_dim or l.hidden_size // l.num_attention_heads,
            "hidden_act": "silu", "hidden_size": l.hidden_size, "initializer_range": 0.02,
            "max_position_embeddings": 262144, "num_attention_heads": l.num_attention_heads,
            "num_hidden_layers": l.num_layers, "num_key_value_heads": l.num_query_groups, "rms_norm_eps": l.norm_eps,
            "layer_types": list(l.layer_types), "linear_num_key_heads": l.linear_num_key_heads,
            "linear_num_value_heads": l.linear_num_value_heads, "linear_key_head_dim": l.linear_key_head_dim,
            "linear_value_head_dim": l.linear_value_head_dim, "linear_conv_kernel_dim": l.linear_conv_kernel_dim,
            # the MTP head exists (and an export carries its mtp.* weights) only when it was trained
            "mtp_num_hidden_layers": mtp_layers_built(cfg),
            "rope_parameters": {
                "rope_type": "default", "rope_theta": l.rope_theta, "partial_rotary_factor": l.partial_rotary_factor,
                "mrope_section": list(l.mrope_section), "mrope_interleaved": True,
            },
            "tie_word_embeddings": l.tie_word_embeddings, "dtype": dtype, "use_cache": True, "vocab_size": l.vocab_size,
        },
        "vision_config": {
            "model_type": f"{cfg.generation}_vision", "depth": v.depth, "hidden_size": v.hidden_size,
            "hidden_act": "gelu_pytorch_tanh", "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
            "in_channels": v.in_channels, "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size, "out_hidden_size": l.hidden_size,
            "num_position_embeddings": v.num_position_embeddings, "initializer_range": 0.02,
        },
        "dtype": dtype,
    }


def check(cfg) -> None:
    """Qwen3.5's own rules: one layer type per layer, Gated DeltaNet heads set, gated partial-rotary attention."""
    from qvl_train.config import ConfigError

    l = cfg.llm
    if len(l.layer_types) != l.num_layers or set(l.layer_types) - set(LAYER_TYPES):
        raise ConfigError(f"model.llm.layer_types must list {l.num_layers} entries (model.llm.num_layers) of "
                          f"{', '.join(LAYER_TYPES)}; got {list(l.layer_types)}")
    if "linear_attention" in l.layer_types and (l.linear_num_key_heads <= 0 or l.linear_num_value_heads <= 0):
        raise ConfigError("model.llm.linear_num_key_heads and linear_num_value_heads must be > 0 for Gated DeltaNet layers")
    if (cfg.mtp_loss_weight > 0 or cfg.mtp_head) and l.mtp_num_layers != 1:
        raise ConfigError(f"model.mtp_loss_weight={cfg.mtp_loss_weight} with model.llm.mtp_num_layers={l.mtp_num_layers}: "
                          "the MTP head is built with one layer (every released Qwen3.5 / 3.6 checkpoint has "
                          "mtp_num_hidden_layers 1); set model.llm.mtp_num_layers=1")
    if cfg.vision.deepstack_visual_indexes:
        raise ConfigError("model.vision.deepstack_visual_indexes must be [] (Qwen3.5's ViT has no DeepStack)")
    rotary = int((l.head_dim or l.hidden_size // l.num_attention_heads) * l.partial_rotary_factor)
    if 2 * sum(l.mrope_section) != rotary:
        raise ConfigError(f"model.llm.mrope_section {list(l.mrope_section)} must sum to half the rotary width "
                          f"({rotary} = head_dim · partial_rotary_factor), i.e. {rotary // 2}")


def hf_rules(cfg):
    from qvl_train.models.hf_convert import rules_qwen3_5

    return rules_qwen3_5(cfg)


QWEN3_5_GENERATION_CONFIG = {"bos_token_id": 248044, "pad_token_id": 248044, "eos_token_id": [248046, 248044], "do_sample": False}
"""`generation_config.json` of an export without an HF source: Qwen3.5's `<|endoftext|>` / `<|im_end|>` ids
(`data_pipelines/generations/qwen3_5.py`), greedy."""

SPEC = ModelSpec(
    name="qwen3_5",
    build=build_vlm("qvl_train.models.vlm:Qwen3_5VLM"),
    hf_architecture=ARCHITECTURES[False],
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_rules=hf_rules,
    hf_generation_config=QWEN3_5_GENERATION_CONFIG,
    sizes=("0_8b", "2b", "4b", "9b", "27b"),  # dense sizes in configs/model/qwen3_5/ (its MoE sizes are qwen3_5_moe's)
    hf_key_style="runtime",
    hf_model_max_length=262144,
    check=check,
)
MOE_SPEC = replace(SPEC, name="qwen3_5_moe", hf_model_type="qwen3_5_moe", hf_architecture=ARCHITECTURES[True], experts=True, sizes=())
"""The same model with routed experts plus a gated shared expert in every LLM layer."""
