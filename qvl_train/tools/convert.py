"""Hugging Face ⇄ framework checkpoints of every registered generation (`launch/convert.py` is the CLI).

The generations are those of `qvl_train.generations.NAMES` (today Qwen-VL, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL and Qwen3-VL-MoE; `launch/convert.py --help` lists them from the registry): a checkpoint's
`config.json` `model_type` picks its `ModelSpec`, whose HF mapping converts config and weights.

    python launch/convert.py import-hf --hf-dir SRC --out DST
    python launch/convert.py export-hf --ckpt SRC --out DST [--dtype bf16|fp16|fp32] [--lora-adapter]

**import-hf** reads `SRC/config.json` and SRC's safetensors only (no transformers import), builds
the `ModelConfig`, converts the weights (`models/hf_convert.py`) into a tp = pp = 1 model in fp32
and saves it with megatron-core `dist_checkpointing` in the checkpoint manager's layout, so
`launch/train.py ... model.init_from=DST` starts from it in any parallel layout:

    DST/latest                   "step_0000000"
    DST/step_0000000/            dist_checkpointing: {"model": sharded weights, "train_state": {...}}
    DST/step_0000000/complete
    DST/model_config.json        the ModelConfig (export reads it back)
    DST/hf_import.json           what export needs to reproduce the source: key spelling, dtype of
                                 every tensor, whether a tied lm_head copy was stored
    DST/hf/                      SRC's config.json, generation_config.json, tokenizer and
                                 preprocessor files, copied verbatim

Weights are stored in fp32 (exact for bf16/fp16 sources; the engine loads them into any dtype).

**export-hf** takes a checkpoint root, a step directory or a training `output_dir`, reads the
model config (`model_config.json`, or the `config.yaml` that `train.py` writes into its output_dir,
one level above `checkpoints/`), loads the weights into a tp = pp = 1 model (dist_checkpointing
reshards whatever layout wrote them) and writes `config.json`, `model-0000i-of-0000n.safetensors`
+ `model.safetensors.index.json`, `generation_config.json` and the tokenizer / preprocessor files.
The HF side files come from the import the checkpoint descends from (`hf/` of the imported
checkpoint, found through `model.init_from` of training runs); without one, config.json and
generation_config.json are generated from the ModelConfig, and so are the tokenizer and image-processor
files (`tools/hf_files.py`; for Qwen-VL v1 a fast tokenizer and a CLIP image-processor config, its
modeling remote code is not generated). The image processor's `min_pixels` / `max_pixels` are the
run's (`data:` of its config.yaml) when the checkpoint comes from a training output_dir, generated or
copied; otherwise the generation's defaults (generated) or the source's (copied).
Import then export reproduces every source tensor bit for bit: names (hub or runtime spelling, as
the source), dtypes, and a tied `lm_head` copy if the source had one.
A LoRA run exports merged (W + alpha/r · B A: a plain HF model), or with `--lora-adapter` as a PEFT
adapter directory for the base model (`_write_peft_adapter`).

Both commands run in one process with a one-rank gloo group (dist_checkpointing needs a process
group, and saves through worker processes: callers need an `if __name__ == "__main__":` guard).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from qvl_train import generations
from qvl_train.config import LLMConfig, LoRAConfig, ModelConfig, VisionConfig

__all__ = [
    "import_hf", "export_hf", "model_config_from_hf", "hf_config_dict", "read_model_config", "load_hf_state_dict",
]

MODEL_CONFIG = "model_config.json"
IMPORT_META = "hf_import.json"
HF_SIDE_DIR = "hf"
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "video_preprocessor_config.json",
    # Qwen-VL: remote code and tiktoken ranks of the released repository (AutoModelForCausalLM / AutoTokenizer
    # with trust_remote_code=True)
    "qwen.tiktoken", "configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "tokenization_qwen.py",
    "visual.py",
)
HF_CONFIG_VERSION = "4.57.0"
"""`transformers_version` of a generated `config.json`: the release series whose layout it follows (the
reference pinned in pyproject.toml). Released checkpoints all carry the key, and transformers
4.57.3–4.x warns "incorrect regex pattern … will lead to incorrect tokenization" (its Mistral check,
`_patch_mistral_regex`) for a local tokenizer whose config.json lacks it or names a version in that range."""
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SHARD_BYTES = 5 * 1024**3


# ---------------------------------------------------------------------------------------- configs
def model_config_from_hf(hf: dict) -> ModelConfig:
    """A released `config.json` → ModelConfig (the mapping of the generation whose `model_type` it has)."""
    return generations.from_hf_model_type(hf.get("model_type")).config_from_hf(hf)


def hf_config_dict(cfg: ModelConfig, dtype: str = "bfloat16") -> dict:
    """A `config.json` in the released checkpoints' format for `cfg` (flat for Qwen2/2.5-VL, nested for Qwen3-VL)."""
    return generations.get(cfg.generation).hf_config(cfg, dtype)


def _generation_config(generation: str = "qwen2_vl") -> dict:
    """The sampling-free defaults of the released Instruct models' generation_config.json (Qwen-VL-Chat's
    remote `chat()` also reads `chat_format` and `max_window_size`)."""
    return dict(generations.get(generation).hf_generation_config)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `dataclasses.asdict(ModelConfig)` (also the `model:` section of a run's config.yaml)."""
    d = dict(d)
    vision = VisionConfig(**d.pop("vision", {}))
    llm = LLMConfig(**d.pop("llm", {}))
    lora = LoRAConfig(**d.pop("lora", {}))
    return ModelConfig(vision=vision, llm=llm, lora=lora, **d)


def read_model_config(step_dir: Path) -> tuple[ModelConfig, Optional[str]]:
    """The ModelConfig of a checkpoint and the `init_from` it descends from (None for imports).

    Looks for `model_config.json` next to the step directory (import) and for the `config.yaml`
    that `train.py` writes into its output_dir (= the parent of `checkpoints/`).
    """
    for d in (step_dir, step_dir.parent):
        if (d / MODEL_CONFIG).exists():
            return model_config_from_dict(json.loads((d / MODEL_CONFIG).read_text())), None
    for d in (step_dir.parent.parent, step_dir.parent):
        if (d / "config.yaml").exists():
            from omegaconf import OmegaConf

            model = OmegaConf.to_container(OmegaConf.load(d / "config.yaml").model, resolve=True)
            return model_config_from_dict(model), model.get("init_from")
    raise FileNotFoundError(
        f"no {MODEL_CONFIG} (import) or config.yaml (training output_dir) found for {step_dir}"
    )


def read_run_pixel_range(step_dir: Path) -> tuple[Optional[int], Optional[int]]:
    """(data.min_pixels, data.max_pixels) of the training run that wrote `step_dir` (its output_dir's
    `config.yaml`, as `read_model_config` finds it); (None, None) for a checkpoint without one (an import)."""
    for d in (step_dir, step_dir.parent):
        if (d / MODEL_CONFIG).exists():
            return None, None
    for d in (step_dir.parent.parent, step_dir.parent):
        if (d / "config.yaml").exists():
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=True).get("data") or {}
            return data.get("min_pixels"), data.get("max_pixels")
    return None, None


def _import_root(step_dir: Path, seen: int = 0) -> Optional[Path]:
    """The root of the imported checkpoint this one descends from (holds `hf_import.json`)."""
    from qvl_train.checkpoint.manager import resolve_checkpoint

    if seen > 16:
        return None
    for d in (step_dir, step_dir.parent):
        if (d / IMPORT_META).exists():
            return d
    try:
        _, init_from = read_model_config(step_dir)
    except FileNotFoundError:
        return None
    if init_from:
        src = resolve_checkpoint(init_from)
        if src is not None:
            return _import_root(src, seen + 1)
    return None


# -------------------------------------------------------------------------------------- safetensors
def load_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files of an HF checkpoint directory."""
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(hf_dir / f)))
    return sd


def _save_safetensors(sd: dict[str, torch.Tensor], out: Path, metadata_dtype: str) -> None:
    """Shards of ≤ 5 GiB (`model-0000i-of-0000n.safetensors`) + `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
    )


# ------------------------------------------------------------------------------------ process group
def _single_process_world() -> None:
    from megatron.core import parallel_state

    from qvl_train.compat.megatron_cpu import install_cpu_compat

    if not torch.cuda.is_available():
        install_cpu_compat()
    if not torch.distributed.is_initialized():
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if torch.distributed.get_world_size() != 1:
        raise RuntimeError("convert runs in one process (the checkpoint is layout-independent)")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def _build(cfg: ModelConfig):
    from qvl_train.config import ParallelConfig
    from qvl_train.models import build_model

    return build_model(cfg, ParallelConfig(), pre_process=True, post_process=True, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ import
def import_hf(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1, ep: int = 1) -> Path:
    """HF checkpoint directory → framework checkpoint root `out` (see module docstring); returns the step dir.

    With a layout (tp, pp, ep) the weights go through a model built in it on processes started here
    (`tools/layout.py`): each rank saves its own shards, as a training run does. The checkpoint is the
    same as a one-process import (the format does not depend on the layout)."""
    from megatron.core import dist_checkpointing

    from qvl_train.checkpoint.manager import COMPLETE, LATEST, TrainState, step_dir_name, write_manifest
    from qvl_train.models.hf_convert import detect_expert_layout, detect_style, hf_to_ours

    hf_dir, out = Path(hf_dir), Path(out)
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    cfg = model_config_from_hf(hf_cfg)
    hf_sd = load_hf_state_dict(hf_dir)
    step_dir = out / step_dir_name(0)
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / COMPLETE).unlink(missing_ok=True)

    if tp * pp * ep > 1:
        from qvl_train.tools.layout import launch

        launch("import", tp, pp, "--hf-dir", str(hf_dir), "--step-dir", str(step_dir), ep=ep)
    else:
        _single_process_world()
        model = _build(cfg)
        missing, unexpected = model.load_state_dict(hf_to_ours(hf_sd, cfg), strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"converted weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        sharded = {"model": model.sharded_state_dict(), "train_state": asdict(TrainState())}
        dist_checkpointing.save(sharded, str(step_dir))
        torch.distributed.barrier()

    (out / MODEL_CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    meta = {
        "source": str(hf_dir.resolve()),
        "generation": cfg.generation,
        "style": detect_style(hf_sd),
        "expert_layout": detect_expert_layout(hf_sd, cfg),  # Qwen3-VL-MoE: export writes the experts back in it
        "tied_lm_head_stored": cfg.llm.tie_word_embeddings and "lm_head.weight" in hf_sd,
        "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in hf_sd.items()},
    }
    (out / IMPORT_META).write_text(json.dumps(meta, indent=1) + "\n")
    side = out / HF_SIDE_DIR
    side.mkdir(exist_ok=True)
    for name in SIDE_FILES:
        if (hf_dir / name).exists():
            shutil.copy2(hf_dir / name, side / name)
    write_manifest(step_dir)  # init_from verifies it before loading
    (step_dir / COMPLETE).write_text("0\n")
    tmp = out / f".{LATEST}.tmp"
    tmp.write_text(step_dir.name + "\n")
    os.replace(tmp, out / LATEST)
    return step_dir


# ------------------------------------------------------------------------------------------ export
def _released_style(cfg: ModelConfig) -> str:
    """Key spelling of the released checkpoints (for a model not imported from HF): `ModelSpec.hf_key_style`
    (Qwen3-VL ships `model.language_model.*` / `model.visual.*`, ``runtime``, which transformers 4.57
    loads for those classes; Qwen2/2.5-VL ship `model.layers.*` / `visual.*`, ``hub``)."""
    return generations.get(cfg.generation).hf_key_style


def export_hf(ckpt: str | Path, out: str | Path, dtype: Optional[str] = None, lora_adapter: bool = False) -> Path:
    """Framework checkpoint (root, step dir or training output_dir) → HF directory `out`.

    `dtype` (bf16 | fp16 | fp32) overrides the tensor dtype; by default every tensor gets the dtype
    it had in the imported HF source, or bf16 when the checkpoint does not descend from an import.
    A LoRA run's checkpoint is written with the adapters merged (W + alpha/r · B A), or with
    `lora_adapter` as a PEFT adapter directory instead (see `_write_peft_adapter`).
    """
    from megatron.core import dist_checkpointing

    from qvl_train.checkpoint.manager import resolve_checkpoint, verify_checkpoint
    from qvl_train.models.hf_convert import ours_to_hf
    from qvl_train.models.lora import merged_state_dict

    step_dir = resolve_checkpoint(ckpt)
    if step_dir is None:
        raise FileNotFoundError(f"{ckpt} holds no complete checkpoint (step dir with 'complete', or a root with 'latest')")
    cfg, init_from = read_model_config(step_dir)
    if lora_adapter and not cfg.lora.enabled:
        raise ValueError(f"{step_dir} is not a LoRA run (model.lora.rank=0): export it without --lora-adapter")
    root = _import_root(step_dir)
    meta = json.loads((root / IMPORT_META).read_text()) if root is not None else {}
    if meta and meta.get("generation") != cfg.generation:
        meta = {}

    verify_checkpoint(step_dir)  # before anything is deserialised
    _single_process_world()
    model = _build(cfg)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step_dir))
    missing, _ = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"checkpoint lacks model tensors: {missing[:8]}")
    if lora_adapter:
        return _write_peft_adapter(model, cfg, Path(out), dtype, _direct_import_source(init_from))
    ours = merged_state_dict(model)  # the plain state dict when the model has no adapters
    hf_sd = ours_to_hf(
        ours, cfg, style=meta.get("style", _released_style(cfg)), write_tied_lm_head=bool(meta.get("tied_lm_head_stored", False)),
        expert_layout=meta.get("expert_layout") or "hub",
    )
    src_dtypes = meta.get("dtypes", {})
    for k in hf_sd:
        want = _DTYPES[dtype] if dtype else getattr(torch, src_dtypes.get(k, "bfloat16"))
        hf_sd[k] = hf_sd[k].to(want).contiguous()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = read_run_pixel_range(step_dir)
    _save_safetensors(hf_sd, out, dtype or "")
    side = root / HF_SIDE_DIR if root is not None else None
    if side is not None and (side / "config.json").exists():
        for name in SIDE_FILES:
            if (side / name).exists():
                shutil.copy2(side / name, out / name)
        if any(v is not None for v in pixels) and generations.get(cfg.generation).hf_preprocessor is None \
                and (out / "preprocessor_config.json").exists():  # the run's image pixel bounds, not the source's
            from qvl_train.tools.hf_files import set_pixel_range

            pre = set_pixel_range(json.loads((out / "preprocessor_config.json").read_text()), *pixels)
            (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        conf = json.loads((out / "config.json").read_text())
        text = conf.get("text_config", conf)
        dropped_mtp = bool(text.get("mtp_num_hidden_layers")) and not any(k.startswith("mtp.") for k in hf_sd)
        if dropped_mtp:  # the source's MTP head was not kept (models/mtp.py: built only when trained): say so
            text["mtp_num_hidden_layers"] = 0
        if dtype:  # the weights changed dtype: say so in config.json
            conf["torch_dtype"] = str(_DTYPES[dtype]).removeprefix("torch.")
        if dtype or dropped_mtp:
            (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    else:  # trained from scratch: config, tokenizer and image processor generated from the ModelConfig
        from qvl_train.tools.hf_files import write_generated_files

        torch_dtype = str(_DTYPES[dtype or "bf16"]).removeprefix("torch.")
        conf = {**hf_config_dict(cfg, torch_dtype)}
        conf.setdefault("transformers_version", HF_CONFIG_VERSION)
        (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        write_generated_files(
            out, cfg.generation, image_tokens=cfg.vision.num_queries, min_pixels=pixels[0], max_pixels=pixels[1],
        )
    if not (out / "generation_config.json").exists():
        (out / "generation_config.json").write_text(json.dumps(_generation_config(cfg.generation), indent=2) + "\n")
    return out


def _direct_import_source(init_from: Optional[str]) -> Optional[str]:
    """The HF directory a run's `model.init_from` was imported from, if init_from is an import."""
    from qvl_train.checkpoint.manager import resolve_checkpoint

    src = resolve_checkpoint(init_from) if init_from else None
    for d in (src, src.parent) if src is not None else ():
        if (d / IMPORT_META).exists():
            return json.loads((d / IMPORT_META).read_text()).get("source")
    return None


def _write_peft_adapter(model, cfg: ModelConfig, out: Path, dtype: Optional[str], base: Optional[str]) -> Path:
    """A PEFT LoRA adapter directory (`PeftModel.from_pretrained(hf_model, out)` loads it).

    `adapter_model.safetensors` holds `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`
    with the transformers runtime module names (`hf_convert.lora_to_hf`: our fused qkv and gate/up
    layers become q/k/v_proj and gate/up_proj sharing A, each with its rows of B). `adapter_config.json`
    has r, lora_alpha (PEFT scales by lora_alpha / r, as we do) and the exact module names. The base
    model is the checkpoint's frozen weights: `base_model_name_or_path` names the HF directory that
    `model.init_from` was imported from when it was one; otherwise export the base with
    `export-hf --ckpt <init_from>`. Tensors are fp32 unless `dtype` says otherwise.
    """
    from safetensors.torch import save_file

    from qvl_train.models.hf_convert import lora_to_hf
    from qvl_train.models.lora import adapter_factors

    want = _DTYPES[dtype or "fp32"]
    tensors = {}
    hf = lora_to_hf(adapter_factors(model), cfg)
    for name, (a, b) in hf.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(want).clone()  # A shared by q/k/v: own copies
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(want).clone()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "target_modules": sorted(hf),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
