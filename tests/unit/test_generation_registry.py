"""The two generation registries agree with each other, with `configs/model/` and with the HF mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipelines import generations as data_generations
from qvl_train import generations
from qvl_train.config import ConfigError, ModelConfig
from tests.unit.test_model_params import load_model_config

ROOT = Path(__file__).resolve().parents[2] / "configs" / "model"


def test_both_sides_register_the_same_generations():
    assert generations.NAMES == data_generations.NAMES


@pytest.mark.parametrize("name", generations.NAMES)
def test_published_sizes_are_the_config_files(name):
    # a folder may hold sizes of a sibling generation (configs/model/qwen3_5/ has the Qwen3.5 MoE sizes too)
    on_disk = {p.stem for p in (ROOT / name).glob("*.yaml") if f"generation: {name}\n" in p.read_text()} - {"tiny"}
    assert on_disk == set(generations.get(name).sizes)
    for size in (*generations.get(name).sizes, "tiny"):
        assert load_model_config(f"{name}/{size}").generation == name


@pytest.mark.parametrize("name", generations.NAMES)
def test_hf_config_round_trip(name):
    """`config.json` written by a generation's mapping is read back by the registry's `model_type` lookup."""
    cfg = load_model_config(f"{name}/tiny")
    hf = generations.get(name).hf_config(cfg, "float32")
    assert generations.from_hf_model_type(hf["model_type"]).name == name
    back = generations.from_hf_model_type(hf["model_type"]).config_from_hf(hf)
    assert back.generation == name and back.llm == cfg.llm and back.vision == cfg.vision


@pytest.mark.parametrize("name", generations.NAMES)
def test_media_token_ids_come_from_the_tokenizer(name):
    from data_pipelines.text import get_tokenizer

    data = data_generations.get(name)
    cfg = ModelConfig(generation=name, vision=load_model_config(f"{name}/tiny").vision,
                      llm=load_model_config(f"{name}/tiny").llm)
    table = data.special_tokens()

    def expected(token):  # Qwen3.5 has its own vocabulary (data.tokenizer=DIR): its table, not the bundled BPE
        own_vocab = table.get(token, -1) != get_tokenizer().special(token)
        return table[token] if own_vocab and token in table else get_tokenizer().special(token)

    assert cfg.image_pad_id == expected(data.image_tokens[1])
    if data.video is None:
        assert cfg.video_pad_id is None
    else:
        assert cfg.video_pad_id == expected(data.video_tokens[1])


def test_unknown_generation_messages_list_the_registered_ones():
    with pytest.raises(ConfigError, match="implemented: qwen_vl, qwen2_vl"):
        ModelConfig(generation="qwen9_vl")
    with pytest.raises(ValueError, match="valid: qwen_vl, qwen2_vl"):
        data_generations.get("qwen9_vl")
    with pytest.raises(ValueError, match="convertible: qwen, qwen2_vl"):
        generations.from_hf_model_type("llama")


def test_moe_rule_follows_the_registry():
    cfg = load_model_config("qwen3_vl_moe/tiny")
    with pytest.raises(ConfigError, match="only qwen3_vl_moe, qwen3_5_moe have experts"):
        ModelConfig(generation="qwen3_vl", vision=cfg.vision, llm=cfg.llm)


def test_pad_id_fields_stay_unset_in_the_schema():
    """The config schema is built from default instances: a resolved id there would leak the default
    generation's pad into every other generation's run."""
    from qvl_train.config import TrainConfig

    model = TrainConfig.__dataclass_fields__["model"].default_factory()
    assert model.image_token_id is None and model.video_token_id is None
    qwen_vl = ModelConfig(generation="qwen_vl", vision=load_model_config("qwen_vl/tiny").vision,
                          llm=load_model_config("qwen_vl/tiny").llm)
    assert qwen_vl.image_pad_id == data_generations.get("qwen_vl").special_tokens()["<imgpad>"]
