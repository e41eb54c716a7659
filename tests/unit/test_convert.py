"""launch/convert.py: HF → framework checkpoint → HF reproduces every tensor bit for bit.

Tiny random HF models (built from the config.json that export generates, so that file is checked
too) are saved with `save_pretrained(safe_serialization=True)` in bf16 and go through the CLI in
subprocesses (dist_checkpointing saves through worker processes). Qwen2-VL with tied embeddings
(as the 2B), Qwen2.5-VL untied with a window-attention ViT, Qwen3-VL (tied, DeepStack) through two
pipeline stages.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
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


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A tiny Qwen2.5-VL imported (`imported`: the import root, with its HF side files) and exported as a
    checkpoint with no HF source (`out`: generated config, tokenizer and image processor; fp32)."""
    from qvl_train.tools.hf_files import write_preprocessor_config

    cfg = tiny_qwen2_5_vl_config()
    hf = _hf_model(cfg, seed=1)
    tmp = tmp_path_factory.mktemp("scratch")
    src, imported, ckpt, out = tmp / "hf", tmp / "imported", tmp / "ckpt", tmp / "out"
    hf.save_pretrained(src, safe_serialization=True)
    write_preprocessor_config(src, "qwen2_5_vl")  # as a hub source ships it: the generation's defaults
    _convert("import-hf", "--hf-dir", src, "--out", imported)
    shutil.copytree(imported, ckpt)
    (ckpt / "hf_import.json").unlink()
    _convert("export-hf", "--ckpt", ckpt / "step_0000000", "--out", out, "--dtype", "fp32")
    return {"hf": hf, "imported": imported, "ckpt": ckpt, "out": out, "tmp": tmp}


def test_export_without_import_metadata_loads_in_transformers(scratch):
    """A checkpoint with no HF source (as from a run started from scratch): generated config.json,
    bf16 default overridden to fp32; the HF class loads it and gives the source model's logits."""
    hf, out = scratch["hf"], scratch["out"]
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


def _pipeline_ids(text: str, specials: dict[str, int]) -> list[int]:
    """The data pipeline's ids of `text`, its special-token strings as their ids (as the template places them)."""
    from data_pipelines.text import get_tokenizer

    ours, ids = get_tokenizer(), []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        ids += [specials[part]] if part in specials else ours.encode(part)
    return ids


def test_exported_tokenizer_generates_like_the_released_one(scratch):
    """`model.generate(**tok(text))` on a generated export: no `token_type_ids`, no "incorrect regex
    pattern" warning (transformers 4.57.3+'s Mistral check, which fires for a config.json without
    `transformers_version`), the released tokenizer class, and ids equal to the data pipeline's on
    text with special tokens, digits, CJK, emoji, combining accents and whitespace runs."""
    from data_pipelines import generations as data_generations

    out = scratch["out"]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, hf_logger = Keep(level=logging.DEBUG), logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = transformers.AutoTokenizer.from_pretrained(out)
            model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
            text = "<|im_start|>user\nHi   there!\t\t12345 猫在屋顶上 🙂 cafe\u0301\n\n  <|im_end|>\n<|im_start|>assistant\n"
            enc = tok(text, return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=2, do_sample=False)
    finally:
        hf_logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "regex" in m or "tokenizer class you load" in m], messages
    assert list(enc) == ["input_ids", "attention_mask"]
    assert gen.shape == (1, enc["input_ids"].shape[1] + 2)
    assert type(tok).__name__ == "Qwen2TokenizerFast"
    assert json.loads((out / "config.json").read_text())["transformers_version"] == "4.57.0"
    specials = data_generations.get("qwen2_5_vl").special_tokens()
    text += "x = 3.14159;   y=[1,2]\r\n  trailing   <|vision_start|><|image_pad|><|vision_end|>naïve 日本語<|im_end|>"
    assert tok(text)["input_ids"] == _pipeline_ids(text, specials)


def _preprocessor(out: Path) -> dict:
    return json.loads((out / "preprocessor_config.json").read_text())


def _as_run(scratch, name: str, init_from=None) -> Path:
    """The scratch checkpoint as a training output_dir: config.yaml (model + data sections) beside checkpoints/."""
    from omegaconf import OmegaConf

    run = scratch["tmp"] / name
    shutil.copytree(scratch["ckpt"], run / "checkpoints")
    model = json.loads((run / "checkpoints" / "model_config.json").read_text())
    (run / "checkpoints" / "model_config.json").unlink()
    model["init_from"] = str(init_from) if init_from else None
    data = {"min_pixels": 6272, "max_pixels": 50176}
    OmegaConf.save(OmegaConf.create({"model": model, "data": data}), run / "config.yaml")
    return run


def test_export_carries_the_runs_pixel_range(scratch, tmp_path):
    """preprocessor_config.json: the generation's defaults without a run config; the run's data.min_pixels /
    data.max_pixels from a training output_dir, generated (from scratch) or copied (run from an import)."""
    from data_pipelines.vision import vision_spec

    spec = vision_spec("qwen2_5_vl")
    pre = _preprocessor(scratch["out"])
    assert (pre["min_pixels"], pre["max_pixels"]) == (spec.min_pixels, spec.max_pixels)
    for name, init_from in (("scratch_run", None), ("finetune_run", scratch["imported"])):
        out = tmp_path / name
        _convert("export-hf", "--ckpt", _as_run(scratch, name, init_from), "--out", out)
        pre = _preprocessor(out)
        assert (pre["min_pixels"], pre["max_pixels"]) == (6272, 50176), name
        assert pre["size"] == {"shortest_edge": 6272, "longest_edge": 50176}, name
        processor = transformers.AutoImageProcessor.from_pretrained(out, use_fast=False)
        assert (processor.min_pixels, processor.max_pixels) == (6272, 50176), name


def test_convert_help_lists_every_registered_generation():
    from qvl_train.generations import NAMES

    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in NAMES), proc.stdout
    import qvl_train.tools.convert as convert

    assert "every registered generation" in convert.__doc__


def test_generated_qwen3_5_tokenizer_is_the_data_pipelines(tmp_path):
    """The tokenizer files an export from scratch writes for Qwen3.5 / 3.6: the bundled Qwen3.5 vocabulary
    (248,044 ranks, its regex, NFC) and its added tokens from 248044, giving the data pipeline's ids — on text
    with special tokens, CJK, emoji, combining accents (NFC) and whitespace runs — and the chat template's."""
    from data_pipelines import generations as data_generations
    from data_pipelines.text import QWEN3_5_SPECIAL_TOKENS, get_tokenizer
    from qvl_train.tools.hf_files import write_tokenizer_files

    write_tokenizer_files(tmp_path, "qwen3_5")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    specials = data_generations.get("qwen3_5").special_tokens()
    assert all(tok.convert_tokens_to_ids(name) == i for name, i in QWEN3_5_SPECIAL_TOKENS.items())
    assert len(tok) == max(QWEN3_5_SPECIAL_TOKENS.values()) + 1
    ours = get_tokenizer(generation="qwen3_5")
    text = ("<|im_start|>user\nHi   there!\t\t12345 猫在屋顶上 🙂 cafe\u0301 Ångström\n\n  <|im_end|>\n"
            "<|vision_start|><|image_pad|><|vision_end|>x = 3.14;  naïve<|im_end|>")
    expected = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        expected += [specials[part]] if part in specials else ours.encode(part)
    assert tok(text)["input_ids"] == expected
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": "A red square."}]
    got = tok.apply_chat_template(messages, tokenize=False)
    want, _ = ours.encode_conversation(messages, [], generation="qwen3_5")
    assert tok.encode(got) == want
