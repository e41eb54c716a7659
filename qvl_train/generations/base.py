"""`ModelSpec`: everything the model side needs to know about one generation.

The model side's registry entry (the data side's is `data_pipelines.generations.DataSpec`): the builder
of the single-device `VLM`, the HF class and `model_type`, the `config.json` mapping both ways, the
weight-name rules of `models/hf_convert.py`, the key spelling of the released checkpoints, the
projector kind (which the FLOP and parameter models read), the config rules that only this
generation has, and the published sizes (`configs/model/<name>/<size>.yaml`). One instance per
generation lives in its own folder of this package and is listed once in `generations/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from qvl_train.config import ModelConfig

PROJECTORS = ("merger", "resampler")


@dataclass(frozen=True)
class ModelSpec:
    """One generation's model side (module docstring)."""

    name: str
    build: Callable[..., object]
    """`build(cfg, parallel, *, pre_process, post_process, dtype, spec_backend, execution, vp_stage) -> VLM`."""
    hf_architecture: str
    """The transformers (or remote-code) class of the released checkpoints."""
    config_from_hf: Callable[[dict], "ModelConfig"]
    """`config.json` → ModelConfig."""
    hf_config: Callable[["ModelConfig", str], dict]
    """ModelConfig, torch dtype name → `config.json` in the released layout."""
    hf_rules: Callable[["ModelConfig"], list]
    """(our key, canonical HF keys, transform) for every tensor (`models/hf_convert.py`)."""
    hf_generation_config: dict
    """`generation_config.json` of an export without an HF source (the Instruct models' greedy defaults)."""
    sizes: tuple[str, ...]
    """Published sizes: `configs/model/<name>/<size>.yaml` each."""
    hf_model_type: str = ""
    """`model_type` in `config.json` (default: the name)."""
    hf_key_style: str = "hub"
    """Key spelling of the released checkpoints: `hub` (`model.layers.*`, `visual.*`) or `runtime`
    (`model.language_model.*`, `model.visual.*`)."""
    hf_model_max_length: int = 131072
    """`model_max_length` of a generated tokenizer config."""
    hf_preprocessor: Optional[Callable[[], dict]] = None
    """`preprocessor_config.json` of a generated export; None = `Qwen2VLImageProcessor` with the data
    spec's image settings."""
    projector: str = "merger"
    """`merger` (2×2 patch merger MLP, plus DeepStack mergers) or `resampler` (Qwen-VL's cross-attention)."""
    experts: bool = False
    """The LLM is a mixture of experts (`model.llm.num_experts > 0` required), else it must be dense."""
    check: Optional[Callable[["ModelConfig"], None]] = None
    """Config rules of this generation only (ConfigError naming the key)."""

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"{self.name}: projector={self.projector!r}; valid: {', '.join(PROJECTORS)}")
        if self.hf_key_style not in ("hub", "runtime"):
            raise ValueError(f"{self.name}: hf_key_style={self.hf_key_style!r}; valid: hub, runtime")
        if not self.hf_model_type:
            object.__setattr__(self, "hf_model_type", self.name)


def build_vlm(vlm_cls_path: str, vision_cls_path: Optional[str] = None) -> Callable[..., object]:
    """A builder for `ModelSpec.build` from import paths (`module:Class`), imported when a model is built
    (the registry stays cheap to import: configs and tools list it without torch models)."""

    def build(cfg, parallel, **kw):
        import importlib

        def load(path: str):
            module, name = path.split(":")
            return getattr(importlib.import_module(module), name)

        extra = {"vision_cls": load(vision_cls_path)} if vision_cls_path else {}
        return load(vlm_cls_path)(cfg, parallel, **extra, **kw)

    return build


def qwen2_llm_from_hf(t: dict, hf: dict):
    """The Qwen2 LLM of Qwen2-VL / Qwen2.5-VL from `config.json` (flat, or its `text_config` merged in)."""
    from qvl_train.config import LLMConfig

    rope = t.get("rope_scaling") or {}
    return LLMConfig(
        num_layers=t["num_hidden_layers"], hidden_size=t["hidden_size"], ffn_hidden_size=t["intermediate_size"],
        num_attention_heads=t["num_attention_heads"], num_query_groups=t["num_key_value_heads"],
        vocab_size=t["vocab_size"], rope_theta=float(t.get("rope_theta", 1e6)),
        mrope_section=list(rope.get("mrope_section", [16, 24, 24])), norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        qkv_bias=True, tie_word_embeddings=bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
    )


def qwen2_vision_common(v: dict) -> dict:
    """ViT fields Qwen2-VL and Qwen2.5-VL spell the same way."""
    return dict(
        depth=v["depth"], num_heads=v["num_heads"], patch_size=v.get("patch_size", 14),
        temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
    )


def qwen2_hf_config(cfg, dtype: str, architecture: str, vision: dict, max_position_embeddings: int) -> dict:
    """The flat `config.json` of Qwen2-VL / Qwen2.5-VL around a generation's `vision_config`."""
    from data_pipelines import generations as data_generations

    special = data_generations.get(cfg.generation).special_tokens()
    l = cfg.llm
    return {
        "architectures": [architecture],
        "model_type": cfg.generation,
        "attention_dropout": 0.0,
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "vision_start_token_id": special["<|vision_start|>"],
        "vision_end_token_id": special["<|vision_end|>"],
        "vision_token_id": special["<|vision_pad|>"],
        "image_token_id": cfg.image_pad_id,
        "video_token_id": cfg.video_pad_id,
        "hidden_act": "silu",
        "hidden_size": l.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": l.ffn_hidden_size,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": l.num_layers,
        "num_attention_heads": l.num_attention_heads,
        "num_hidden_layers": l.num_layers,
        "num_key_value_heads": l.num_query_groups,
        "rms_norm_eps": l.norm_eps,
        "rope_theta": l.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(l.mrope_section)},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": l.tie_word_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": l.vocab_size,
        "vision_config": vision,
    }


QWEN2_GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}
"""The released Instruct models' `generation_config.json` without sampling settings (Qwen2/2.5/3-VL)."""
