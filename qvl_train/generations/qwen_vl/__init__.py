"""Qwen-VL (v1, 9.6B): ViT-bigG at a fixed 448², one cross-attention resampler with 256 learnable
queries (`models/vision/qwen_vl.py`), Qwen-7B with 1-D RoPE. No transformers class: the released
remote code (`QWenLMHeadModel`, `model_type: qwen`, ViT settings under `visual`)."""

from __future__ import annotations

from qvl_train.generations.base import ModelSpec, build_vlm

ARCHITECTURE = "QWenLMHeadModel"


def check(cfg) -> None:
    """Qwen-VL: fixed square input, a square number of queries and of position rows, no merge."""
    from qvl_train.config import ConfigError

    v = cfg.vision
    if not v.image_size or v.image_size % v.patch_size:
        raise ConfigError(f"model.vision.image_size={v.image_size} must be a multiple of patch_size={v.patch_size} (448)")
    for key in ("num_queries", "num_position_embeddings"):
        n = getattr(v, key) or 0
        if n < 1 or int(n**0.5) ** 2 != n:
            raise ConfigError(f"model.vision.{key}={n} must be a square number (256 for Qwen-VL)")
    if v.temporal_patch_size != 1 or v.spatial_merge_size != 1:
        raise ConfigError("Qwen-VL has no temporal patches and no merger: set model.vision.temporal_patch_size=1 "
                          "and model.vision.spatial_merge_size=1")
    heads = v.resampler_heads or cfg.llm.hidden_size // 128
    if heads < 1 or cfg.llm.hidden_size % heads:
        raise ConfigError(f"model.vision.resampler_heads={v.resampler_heads}: the LLM width {cfg.llm.hidden_size} "
                          "must split into that many heads (0 = hidden_size / 128)")


def config_from_hf(hf: dict):
    """Qwen-VL `config.json` (`model_type: qwen`, ViT settings under `visual`) → ModelConfig."""
    from qvl_train.config import LLMConfig, ModelConfig, VisionConfig

    v = hf.get("visual")
    if not v:
        raise ValueError("config.json has model_type 'qwen' but no 'visual' section: a text-only Qwen, not Qwen-VL")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("kv_channels", hidden // heads)
    llm = LLMConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=hf["intermediate_size"] // 2,
        num_attention_heads=heads, num_query_groups=heads, vocab_size=hf["vocab_size"],
        rope_theta=float(hf.get("rotary_emb_base", 10000)), mrope_section=[head_dim // 2, 0, 0],
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), qkv_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim=None if head_dim * heads == hidden else head_dim,
    )
    if v.get("output_dim", hidden) != hidden:
        raise ValueError(f"visual.output_dim={v['output_dim']} differs from the LLM width {hidden}")
    vision = VisionConfig(
        depth=v["layers"], hidden_size=v["width"], num_heads=v["heads"], intermediate_size=int(v["width"] * v["mlp_ratio"]),
        patch_size=v["patch_size"], temporal_patch_size=1, spatial_merge_size=1, mlp="gelu", image_size=v["image_size"],
        num_position_embeddings=v.get("num_position_embeddings", 256), num_queries=v.get("n_queries", 256),
        resampler_heads=v.get("resampler_heads", 0),
    )
    return ModelConfig(generation="qwen_vl", vision=vision, llm=llm)


def hf_config(cfg, dtype: str) -> dict:
    """`config.json` as released with Qwen/Qwen-VL (remote code `QWenLMHeadModel`). Settings the released
    code hard-codes (256 position rows, LLM width / 128 resampler heads) are written only when they differ."""
    from data_pipelines import generations as data_generations

    v, l = cfg.vision, cfg.llm
    head_dim = l.head_dim or l.hidden_size // l.num_attention_heads
    visual = {
        "heads": v.num_heads, "image_size": v.image_size,
        "image_start_id": data_generations.get(cfg.generation).special_tokens()["<img>"], "layers": v.depth,
        "mlp_ratio": round((v.intermediate_size or v.hidden_size * v.mlp_ratio) / v.hidden_size, 4),
        "output_dim": l.hidden_size, "patch_size": v.patch_size, "width": v.hidden_size,
    }
    if v.num_queries != 256:
        visual["n_queries"] = v.num_queries
    if v.num_position_embeddings != 256:
        visual["num_position_embeddings"] = v.num_position_embeddings
    if v.resampler_heads and v.resampler_heads != l.hidden_size // 128:
        visual["resampler_heads"] = v.resampler_heads
    return {
        "architectures": [ARCHITECTURE], "attn_dropout_prob": 0.0,
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "bf16": dtype == "bfloat16", "emb_dropout_prob": 0.0, "fp16": dtype == "float16", "fp32": dtype == "float32",
        "hidden_size": l.hidden_size, "initializer_range": 0.02, "intermediate_size": 2 * l.ffn_hidden_size,
        "kv_channels": head_dim, "layer_norm_epsilon": l.norm_eps, "max_position_embeddings": 8192, "model_type": "qwen",
        "no_bias": True, "num_attention_heads": l.num_attention_heads, "num_hidden_layers": l.num_layers,
        "onnx_safe": None, "rotary_emb_base": int(l.rope_theta) if float(l.rope_theta).is_integer() else l.rope_theta,
        "rotary_pct": 1.0, "scale_attn_weights": True,
        "seq_length": 2048, "tie_word_embeddings": l.tie_word_embeddings, "tokenizer_type": "QWenTokenizer",
        "torch_dtype": dtype, "transformers_version": "4.31.0", "use_cache": True, "use_dynamic_ntk": True,
        "use_flash_attn": False, "use_logn_attn": True, "visual": visual, "vocab_size": l.vocab_size,
    }


def hf_rules(cfg):
    from qvl_train.models.hf_convert import rules_qwen_vl

    return rules_qwen_vl(cfg)


def preprocessor() -> dict:
    """Qwen-VL's released image transform (`visual.py`: Resize((448, 448), bicubic) → ToTensor →
    Normalize with CLIP mean/std) as a `CLIPImageProcessor`: an exact-size resize, no crop."""
    from data_pipelines.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, QWEN_VL_IMAGE_SIZE

    return {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"height": QWEN_VL_IMAGE_SIZE, "width": QWEN_VL_IMAGE_SIZE}, "resample": 3, "do_center_crop": False,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
    }


SPEC = ModelSpec(
    name="qwen_vl",
    build=build_vlm("qvl_train.models.vision.qwen_vl:QwenVLM"),
    hf_architecture=ARCHITECTURE,
    hf_model_type="qwen",
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_rules=hf_rules,
    hf_generation_config={"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                          "max_window_size": 6144, "max_new_tokens": 512, "do_sample": False},
    sizes=("7b",),
    hf_model_max_length=8192,
    hf_preprocessor=preprocessor,
    projector="resampler",
    check=check,
)
