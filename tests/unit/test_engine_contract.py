"""Both engines implement `engines/base.Engine`: the members train.py, the evaluator and the checkpoint
manager call, with the same signatures; neither engine reaches into the other's private names."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from qvl_train.engines.base import Engine, StepResult
from tests.conftest import ROOT, megatron_one_rank_world

MEMBERS = [name for name, value in vars(Engine).items()
           if not name.startswith("_") and (callable(value) or isinstance(value, property))]  # + the `model` attribute


def _engine_classes():
    from qvl_train.engines.deepspeed import DeepSpeedEngine
    from qvl_train.engines.megatron import MegatronEngine

    return [MegatronEngine, DeepSpeedEngine]


def test_the_contract_names_about_eleven_documented_members():
    assert {"train_step", "eval_step", "sharded_state_dict", "load_sharded", "current_lr"} <= set(MEMBERS)
    assert "model" in Engine.__annotations__ and 9 <= len(MEMBERS) <= 12, MEMBERS
    for name in MEMBERS:
        assert inspect.getdoc(getattr(Engine, name)), f"Engine.{name} has no docstring"


@pytest.mark.parametrize("cls", _engine_classes(), ids=lambda c: c.__name__)
def test_each_engine_has_every_member_with_the_same_signature(cls):
    for name in MEMBERS:
        want, have = getattr(Engine, name), getattr(cls, name, None)
        assert have is not None, f"{cls.__name__} lacks {name}"
        if isinstance(want, property):
            assert isinstance(have, property), f"{cls.__name__}.{name} is not a property"
            continue
        assert list(inspect.signature(have).parameters) == list(inspect.signature(want).parameters), name
    assert inspect.signature(cls.train_step).return_annotation in (StepResult, "StepResult")


def test_deepspeed_engine_imports_nothing_from_the_megatron_engine():
    tree = ast.parse((Path(ROOT) / "qvl_train" / "engines" / "deepspeed.py").read_text())
    sources = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "qvl_train.engines.megatron" not in sources


def test_a_built_megatron_engine_is_an_engine():
    from qvl_train.config import OptimConfig, ParallelConfig, StageConfig
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.models.tiny import tiny_model_config
    from qvl_train.parallel.dims import ParallelDims, megatron_groups

    megatron_one_rank_world()
    dims = ParallelDims(tp=1, pp=1, cp=1, dp=1, world_size=1)
    dims.groups = megatron_groups()
    engine = MegatronEngine(tiny_model_config(), ParallelConfig(), OptimConfig(), StageConfig("stage2_multitask"), dims,
                            seed=0, max_steps=2)
    assert isinstance(engine, Engine)
