"""The model a checkpoint belongs to, against the run's: refused, warned, taken over or unchecked."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from qvl_train.checkpoint.manager import (
    MODEL_ARCH,
    ModelMismatchError,
    check_checkpoint_model,
    model_arch,
    model_differences,
)
from qvl_train.config import TrainConfig
from qvl_train.models.tiny import tiny_model_config
from tests.conftest import ROOT

CONFIGS = ROOT / "configs" / "model"


def _checkpoint(root, model=None, step=3):
    step_dir = root / "checkpoints" / f"step_{step:07d}"
    step_dir.mkdir(parents=True)
    (step_dir / "complete").write_text(f"{step}\n")
    (root / "checkpoints" / "latest").write_text(step_dir.name + "\n")
    if model is not None:
        (step_dir / MODEL_ARCH).write_text(json.dumps(model_arch(model)))
    return step_dir


def _run(out, **model_overrides):
    return TrainConfig(output_dir=str(out), model=tiny_model_config(**model_overrides))


def test_shape_keys_refuse_and_the_others_warn():
    a, b = model_arch(tiny_model_config()), model_arch(tiny_model_config())
    b["llm"] = {**b["llm"], "rope_theta": 5e5, "num_layers": 3}
    b["lora"] = {**b["lora"], "rank": 8}
    refuse, warn = model_differences(a, b, lora=True)
    assert refuse == ["model.llm.num_layers: checkpoint 2 vs run 3", "model.lora.rank: checkpoint 0 vs run 8"]
    assert warn == ["model.llm.rope_theta: checkpoint 10000.0 vs run 500000.0"]
    assert model_differences(a, b, lora=False)[0] == ["model.llm.num_layers: checkpoint 2 vs run 3"]
    assert "init_from" not in model_arch(tiny_model_config()) and "init_std" not in model_arch(tiny_model_config())


def test_resume_of_another_model_is_refused_with_the_fix(tmp_path):
    _checkpoint(tmp_path, tiny_model_config())
    cfg = _run(tmp_path)
    cfg.model.llm.num_layers = 4
    with pytest.raises(ModelMismatchError) as err:
        check_checkpoint_model(cfg, arch_overridden=True, configs_dir=CONFIGS)
    text = str(err.value)
    assert "model.llm.num_layers: checkpoint 2 vs run 4" in text and "model=qwen2_vl/tiny" in text
    assert "checkpoint.resume=never" in text and len(text.splitlines()) <= 4
    cfg.checkpoint.resume = "never"
    assert check_checkpoint_model(cfg, arch_overridden=True, configs_dir=CONFIGS) == []


def test_same_shapes_resume_with_a_warning_and_no_config_is_one_warning(tmp_path):
    _checkpoint(tmp_path / "a", tiny_model_config())
    cfg = _run(tmp_path / "a")
    cfg.model.llm.rope_theta = 5e5
    (note,) = check_checkpoint_model(cfg, arch_overridden=True, configs_dir=CONFIGS)
    assert note.startswith("warning:") and "model.llm.rope_theta" in note
    _checkpoint(tmp_path / "b")  # written before model_arch.json, no config.yaml beside it
    (note,) = check_checkpoint_model(_run(tmp_path / "b"), arch_overridden=False, configs_dir=CONFIGS)
    assert note.startswith("warning:") and "not checked" in note


def test_init_from_an_import_is_taken_unless_architecture_keys_are_set(tmp_path):
    imported = tiny_model_config()
    imported.llm.num_layers, imported.llm.tie_word_embeddings = 3, True
    (tmp_path / "ckpt" / "step_0000000").mkdir(parents=True)
    (tmp_path / "ckpt" / "step_0000000" / "complete").write_text("0\n")
    (tmp_path / "ckpt" / "latest").write_text("step_0000000\n")
    (tmp_path / "ckpt" / "model_config.json").write_text(json.dumps(asdict(imported)))
    cfg = _run(tmp_path / "run", init_from=str(tmp_path / "ckpt"))
    cfg.model.lora.rank = 4
    (note,) = check_checkpoint_model(cfg, arch_overridden=False, configs_dir=CONFIGS)
    assert "taken from model.init_from" in note and "LLM 3×64" in note
    assert (cfg.model.llm.num_layers, cfg.model.llm.tie_word_embeddings) == (3, True)
    assert cfg.model.init_from == str(tmp_path / "ckpt") and cfg.model.lora.rank == 4  # run keys stay

    cfg = _run(tmp_path / "run", init_from=str(tmp_path / "ckpt"))
    with pytest.raises(ModelMismatchError, match="model.llm.num_layers: checkpoint 3 vs run 2"):
        check_checkpoint_model(cfg, arch_overridden=True, configs_dir=CONFIGS)


def test_init_from_without_a_checkpoint_is_a_config_error(tmp_path, data_root):
    from qvl_train.config import ConfigError

    cfg = _run(tmp_path / "run", init_from=str(tmp_path / "nothing"))
    cfg.data.sources[0].path = str(data_root / "synth")
    with pytest.raises(ConfigError, match="model.init_from=.*nothing holds no complete checkpoint"):
        cfg.check_inputs([])
    _checkpoint(tmp_path / "run", tiny_model_config())  # the run's own checkpoint wins: init_from is not read
    assert cfg.check_inputs([]) == []
