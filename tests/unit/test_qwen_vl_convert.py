"""Qwen-VL export/import: the original checkpoint names of its public remote code, config.json as released,
and a bit-exact round trip through `launch/convert.py`.

`tests/fixtures/qwen_vl_7b_names.txt` (names and shapes of every tensor of Qwen-VL-7B) is written by
`tests/fixtures/make_qwen_vl_names.py` from the public module tree, independently of the conversion
rules; the 7B model is built on the meta device (no memory) to produce the exported names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qvl_train.config import ParallelConfig
from qvl_train.models import build_model
from qvl_train.models.hf_convert import hf_to_ours, ours_to_hf
from qvl_train.tools.convert import hf_config_dict, load_hf_state_dict, model_config_from_hf
from tests.conftest import megatron_one_rank_world  # noqa: E402
from tests.unit.test_convert import _convert
from tests.unit.test_model_params import load_model_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen_vl_7b_names.txt"


def _meta_state_dict(cfg) -> dict[str, torch.Tensor]:
    megatron_one_rank_world()
    with torch.device("meta"):
        model = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_export_names_and_shapes_are_the_released_ones():
    cfg = load_model_config("qwen_vl/7b")
    hf = ours_to_hf(_meta_state_dict(cfg), cfg)
    got = sorted(f"{k} {'x'.join(map(str, v.shape))}" for k, v in hf.items())
    assert got == FIXTURE.read_text().splitlines()


def test_config_json_as_released_and_back():
    cfg = load_model_config("qwen_vl/7b")
    conf = hf_config_dict(cfg, "bfloat16")
    assert conf["visual"] == {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
                              "output_dim": 4096, "patch_size": 14, "width": 1664}
    assert (conf["model_type"], conf["intermediate_size"], conf["kv_channels"], conf["rotary_emb_base"]) == ("qwen", 22016, 128, 10000)
    for name in ("qwen_vl/7b", "qwen_vl/tiny"):
        full = load_model_config(name)
        back = model_config_from_hf(hf_config_dict(full))
        assert (back.generation, back.vision, back.llm) == (full.generation, full.vision, full.llm)


def test_import_export_bit_identical(tmp_path):
    """Random bf16 tensors under the released names → import-hf → export-hf: every tensor, name and config equal."""
    cfg = load_model_config("qwen_vl/tiny")
    g = torch.Generator().manual_seed(0)
    ours = {k: torch.randn(v.shape, generator=g).to(torch.bfloat16) for k, v in _meta_state_dict(cfg).items()}
    src_sd = ours_to_hf(ours, cfg)
    assert {k: v for k, v in hf_to_ours(src_sd, cfg).items()}.keys() == ours.keys()
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    src.mkdir()
    from safetensors.torch import save_file

    save_file(src_sd, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(hf_config_dict(cfg, "bfloat16"), indent=2))
    _convert("import-hf", "--hf-dir", src, "--out", ckpt)
    _convert("export-hf", "--ckpt", ckpt, "--out", out)
    a, b = load_hf_state_dict(src), load_hf_state_dict(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    # through a model built at tp=2 (ViT, resampler and LLM sharded on save, gathered on export)
    _convert("import-hf", "--hf-dir", src, "--out", tmp_path / "ckpt_tp2", "--tp", "2")
    _convert("export-hf", "--ckpt", tmp_path / "ckpt_tp2", "--out", tmp_path / "out_tp2")
    c = load_hf_state_dict(tmp_path / "out_tp2")
    assert sorted(c) == sorted(a) and all(torch.equal(a[k], c[k]) for k in a)

    # The same checkpoint as if trained from scratch (no HF source): everything generated.
    (ckpt / "hf_import.json").unlink()
    _convert("export-hf", "--ckpt", ckpt, "--out", tmp_path / "scratch")
    _check_generated_files(tmp_path / "scratch", cfg)


def _check_generated_files(out: Path, cfg) -> None:
    """A from-scratch Qwen-VL export: released config / generation config names; a fast tokenizer that
    `AutoTokenizer` loads without remote code and whose chat template + tokenisation give the data
    pipeline's ids for a grounding sample; `AutoImageProcessor` giving the pipeline's 448² pixels."""
    import numpy as np
    import transformers
    from PIL import Image

    from data_pipelines.text import QWEN_VL_SPECIAL_TOKENS, get_tokenizer
    from data_pipelines.vision import preprocess_qwen_vl

    assert json.loads((out / "config.json").read_text()) == hf_config_dict(cfg, "bfloat16")
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["chat_format"], gen["eos_token_id"], gen["max_window_size"]) == ("chatml", 151643, 6144)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert {n: tok.convert_tokens_to_ids(n) for n in QWEN_VL_SPECIAL_TOKENS} == QWEN_VL_SPECIAL_TOKENS
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|extra_0|>", "<|extra_204|>"]) == [151645, 151646, 151850]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Picture 1: "}, {"type": "image", "image": "a.png"},
                                     {"type": "text", "text": "\nWhere is the red circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here: "},
                                          {"type": "box", "ref": "the red circle", "box": [100, 50, 300, 150]}]},
    ]
    expected, _ = get_tokenizer().encode_conversation(
        messages, [256], generation="qwen_vl", image_sizes={"a.png": ((200, 400), (448, 448))})
    as_text = [messages[0], {"role": "assistant", "content": "Here: <ref>the red circle</ref><box>(250,250),(750,750)</box>"}]
    assert tok.apply_chat_template(as_text, tokenize=True) == expected
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert prompt.count("<imgpad>") == 256 and prompt.endswith("<|im_start|>assistant\n")

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 90, 3), dtype=np.uint8))
    pixels = transformers.AutoImageProcessor.from_pretrained(out)(images=[image], return_tensors="pt")["pixel_values"]
    rows, _ = preprocess_qwen_vl(image)
    patches = pixels[0].reshape(3, 32, 14, 32, 14).permute(1, 3, 0, 2, 4).reshape(1024, -1)
    torch.testing.assert_close(patches, torch.from_numpy(rows), rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"])
def test_c_attn_is_q_k_v_over_all_heads(key):
    """c_attn rows [q; k; v]: our fused per-head layout puts q of head 0 first, then its k, then its v."""
    cfg = load_model_config("qwen_vl/tiny")
    src = {k: torch.randn(v.shape) for k, v in ours_to_hf(_meta_state_dict(cfg), cfg).items()}
    fused = hf_to_ours(src, cfg)["llm.decoder.layers.0.self_attention.linear_qkv." + key.rsplit(".", 1)[1]]
    q, k, v = src[key].chunk(3)
    d = cfg.llm.hidden_size // cfg.llm.num_attention_heads
    assert torch.equal(fused[:d], q[:d]) and torch.equal(fused[d:2 * d], k[:d]) and torch.equal(fused[2 * d:3 * d], v[:d])
