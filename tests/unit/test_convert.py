"""launch/convert.py: HF → framework checkpoint → HF reproduces every tensor bit for bit.

Tiny random HF models (built from the config.json that export generates, so that file is checked
too) are saved with `save_pretrained(safe_serialization=True)` in bf16 and go through the CLI in
subprocesses (dist_checkpointing saves through worker processes). Qwen2-VL with tied embeddings
(as the 2B), Qwen2.5-VL untied with a window-attention ViT, Qwen3-VL (tied, DeepStack) through two
pipeline stages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qvl_train.models.tiny import tiny_model_config, tiny_qwen2_5_vl_config, tiny_qwen3_vl_config  # noqa: E402
from qvl_train.tools.convert import hf_config_dict, model_config_from_hf  # noqa: E402
from tests.conftest import clean_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cfg(generation):
    if generation == "qwen2_vl":
        cfg = tiny_model_config()
        cfg.llm.tie_word_embeddings = True
        return cfg
    return tiny_qwen3_vl_config() if generation == "qwen3_vl" else tiny_qwen2_5_vl_config()


def _hf_model(cfg, seed=0):
    if cfg.generation == "qwen3_vl":
        from tests.parity.test_qwen3_vl_parity import hf_model

        return hf_model(cfg, seed=seed)
    cls = {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    }[cfg.generation]
    conf_cls = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig}[cfg.generation]
    torch.manual_seed(seed)
    model = cls(conf_cls(**hf_config_dict(cfg, "float32"))).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def _convert(*args):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "convert.py"), *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**clean_env(), "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from qvl_train.tools.convert import load_hf_state_dict

    return load_hf_state_dict(d)


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen2_5_vl"])
def test_config_json_round_trip(generation):
    cfg = _cfg(generation)
    back = model_config_from_hf(hf_config_dict(cfg))
    assert (back.generation, back.vision, back.llm) == (cfg.generation, cfg.vision, cfg.llm)
    # the released configs too
    from tests.unit.test_model_params import PUBLISHED, load_model_config

    for name in PUBLISHED:
        full = load_model_config(name)
        assert model_config_from_hf(hf_config_dict(full)).llm == full.llm
        assert model_config_from_hf(hf_config_dict(full)).vision == full.vision


@pytest.mark.parametrize(
    "generation, layout",
    [
        ("qwen2_vl", []),
        ("qwen2_5_vl", []),
        # through a model built at tp=2 × pp=2 (4 processes saving their shards; tied embeddings across stages)
        ("qwen2_vl", ["--tp", "2", "--pp", "2"]),
        # window-ordered ViT at tp=2
        ("qwen2_5_vl", ["--tp", "2"]),
        # DeepStack into LLM layers 0-1 of 3: the first of two stages takes 2 layers
        ("qwen3_vl", ["--pp", "2"]),
    ],
)
def test_import_export_bit_identical(generation, layout, tmp_path):
    cfg = _cfg(generation)
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    _hf_model(cfg).to(torch.bfloat16).save_pretrained(src, safe_serialization=True)
    _convert("import-hf", "--hf-dir", src, "--out", ckpt, *layout)
    assert (ckpt / "latest").read_text().strip() == "step_0000000"
    assert (ckpt / "step_0000000" / "complete").exists()
    _convert("export-hf", "--ckpt", ckpt, "--out", out)

    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    assert ("lm_head.weight" in a) == (not cfg.llm.tie_word_embeddings)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (out / "generation_config.json").exists() and (out / "model.safetensors.index.json").exists()


def test_export_without_import_metadata_loads_in_transformers(tmp_path):
    """A checkpoint with no HF source (as from a run started from scratch): generated config.json,
    bf16 default overridden to fp32; the HF class loads it and gives the source model's logits."""
    cfg = tiny_qwen2_5_vl_config()
    hf = _hf_model(cfg, seed=1)
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    hf.save_pretrained(src, safe_serialization=True)
    _convert("import-hf", "--hf-dir", src, "--out", ckpt)
    (ckpt / "hf_import.json").unlink()
    _convert("export-hf", "--ckpt", ckpt / "step_0000000", "--out", out, "--dtype", "fp32")
    back, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=0, atol=0)

    # Tokenizer and image processor are generated too: what the data pipeline feeds the model.
    from PIL import Image

    from data_pipelines.text import get_tokenizer
    from data_pipelines.vision import preprocess_image

    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = get_tokenizer()
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What colour is the square?"}]},
        {"role": "assistant", "content": "Red, 12×7 px."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False).replace("<|image_pad|>", "<|image_pad|>" * 6)
    expected, _ = ours.encode_conversation(messages, [6], generation="qwen2_5_vl")
    assert tok.encode(text) == expected
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    processor = transformers.AutoImageProcessor.from_pretrained(out, use_fast=False)
    image = Image.new("RGB", (90, 61), (200, 30, 40))
    image.paste((10, 200, 90), (20, 10, 50, 40))
    got = processor(images=[image], return_tensors="pt")
    pixels, grid = preprocess_image(image, "qwen2_5_vl")
    assert got["image_grid_thw"].tolist() == [list(grid)]
    torch.testing.assert_close(got["pixel_values"], torch.as_tensor(pixels), rtol=0, atol=1e-5)
