"""Config: every group and experiment composes into a valid TrainConfig; every validation error is clear."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qvl_train.config import ConfigError, register_configs, to_train_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
register_configs()


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=list(overrides)))


def _options(group: str) -> list[str]:
    base = CONFIGS / group
    return sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.yaml"))


def _world(cfg) -> int:
    """The experiment's GPU count where it names one, else the smallest world its layout fits."""
    p = cfg.parallel
    return cfg.cluster.gpus or math.lcm(p.tp * p.pp * p.cp * (p.dp or 1), p.ep * p.etp * p.pp)


def _validate(cfg) -> None:
    """Every shipped option and experiment validates at its own world size (every layout trains)."""
    cfg.validate(_world(cfg))


@pytest.mark.parametrize(
    "group", ["model", "data", "parallel", "stage", "optim", "engine", "cluster"]
)
def test_every_group_option_composes(group):
    options = _options(group)
    assert options, f"configs/{group} is empty"
    for option in options:
        cfg = _compose(f"{group}={option}")
        if group == "model":
            cfg.parallel.tp = 1
        _validate(cfg)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    cfg = _compose(f"+experiment={experiment}")
    _validate(cfg)
    for stage in _options("stage"):
        assert _compose(f"+experiment={experiment}", f"stage={stage}").stage.name == stage


def test_user_keys_reach_the_typed_config():
    cfg = _compose(
        "+experiment=tiny", "output_dir=/tmp/x", "seed=7", "train.max_steps=9", "train.global_batch_tokens=4096",
        "data.max_tokens=512", "parallel.tp=2", "parallel.pp=1", "parallel.dp=4", "model.init_from=/ckpt",
        "stage=stage1_align", "checkpoint.every=3", "checkpoint.resume=never", "wandb.mode=disabled", "dry_run=true",
    )
    assert (cfg.output_dir, cfg.seed, cfg.train.max_steps, cfg.train.global_batch_tokens) == ("/tmp/x", 7, 9, 4096)
    assert (cfg.data.max_tokens, cfg.parallel.tp, cfg.parallel.dp, cfg.model.init_from) == (512, 2, 4, "/ckpt")
    assert (cfg.stage.trainable, cfg.checkpoint.every, cfg.wandb.mode, cfg.dry_run) == (("projector",), 3, "disabled", True)
    assert cfg.data.generation == cfg.model.generation
    cfg.validate(8)


@pytest.mark.parametrize(
    "overrides, world, key",
    [
        (["parallel.tp=2"], 3, "parallel.tp"),  # world not divisible by tp·pp·cp
        (["parallel.dp=3"], 2, "parallel.dp"),  # world != tp·pp·cp·dp
        (["parallel.tp=8", "model.llm.vocab_size=151936"], 8, "num_attention_heads"),  # heads % tp
        (["parallel.pp=4"], 4, "parallel.pp"),  # more stages than layers (tiny has 2)
        (["parallel.pp=2", "parallel.first_stage_layers=2"], 2, "parallel.first_stage_layers"),
        (["train.global_batch_tokens=3072"], 2, "train.global_batch_tokens"),  # 3 micro-batches over dp=2
        (["train.global_batch_tokens=1000"], 1, "data.max_tokens"),  # not a multiple
        (["parallel.ep=2"], 2, "parallel.ep"),  # expert parallel without experts
        (["model=qwen3_vl_moe/tiny", "parallel.ep=3"], 3, "num_experts"),  # 4 % 3
        (["model=qwen3_vl_moe/tiny", "parallel.ep=2"], 3, "parallel.ep"),  # 3 % ep·etp·pp
        (["model=qwen3_vl_moe/tiny", "parallel.tp=2"], 2, "parallel.sp"),  # MoE under tp needs sp
        (["parallel.tp=2", "parallel.sp=true", "data.max_tokens=1023", "train.global_batch_tokens=1023"], 2,
         "data.max_tokens"),  # sequence parallelism splits the packed length over tp
        (["parallel.cp=2"], 3, "parallel.tp·pp·cp"),  # world not divisible by cp
        (["parallel.cp=2", "parallel.pp=2"], 2, "parallel.tp·pp·cp"),  # cp × pp needs cp·pp ranks
        (["model=qwen3_vl_moe/tiny", "parallel.cp=2", "parallel.ep=4"], 2, "parallel.ep"),  # ep·etp·pp ∤ world
        # the interleaved schedule: pp > 1, whole layers per chunk, micro-batches per dp rank a multiple of pp
        (["parallel.vpp=2"], 1, "parallel.pp"),
        (["parallel.pp=2", "parallel.vpp=2"], 2, "parallel.vpp"),  # 2 layers, 4 chunks
        (["parallel.pp=2", "parallel.vpp=2", "model.llm.num_layers=6", "parallel.first_stage_layers=3"], 2,
         "parallel.first_stage_layers"),
        (["parallel.pp=2", "parallel.vpp=2", "model.llm.num_layers=4", "train.global_batch_tokens=3072"], 2,
         "train.global_batch_tokens"),  # 3 micro-batches, pp=2
        (["model=qwen3_vl/tiny", "parallel.pp=2", "parallel.vpp=2", "model.llm.num_layers=4"], 2,
         "parallel.first_stage_layers"),  # DeepStack layers 0-1, chunk 0 holds layer 0 only
    ],
)
def test_validation_errors_name_the_key(overrides, world, key):
    cfg = _compose("+experiment=tiny", *overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate(world)


def test_context_parallel_combines_with_pipeline_and_experts():
    """cp × pp (with tp + sp, and with the interleaved schedule) and cp with a mixture-of-experts model
    (with expert parallelism over the CP ranks) validate; they compute the one-process step
    (tests/distributed/test_grad_equivalence.py)."""
    _compose("+experiment=tiny", "parallel.cp=2", "parallel.pp=2").validate(4)
    _compose("+experiment=tiny", "parallel.cp=2", "parallel.pp=2", "parallel.tp=2", "parallel.sp=true").validate(8)
    _compose("+experiment=tiny_qwen3_vl", "parallel.cp=2", "parallel.pp=2", "parallel.vpp=2", "model.llm.num_layers=6",
             "parallel.first_stage_layers=4").validate(4)
    _compose("+experiment=tiny_qwen3_vl_moe", "parallel.cp=2").validate(2)
    _compose("+experiment=tiny_qwen3_vl_moe", "parallel.cp=2", "parallel.ep=2").validate(2)
    _compose("+experiment=tiny_qwen3_vl_moe", "parallel.cp=2", "parallel.ep=2", "parallel.tp=2", "parallel.sp=true").validate(4)


def test_interleaved_layouts_validate():
    """Even chunks, and an uneven first stage whose layers and the others' both divide by vpp; also with
    experts, expert parallelism and the distributed optimizer (the layout of a 235B-A22B run)."""
    _compose("+experiment=tiny", "parallel.pp=2", "parallel.vpp=2", "model.llm.num_layers=4").validate(2)
    _compose("+experiment=tiny_qwen3_vl", "parallel.pp=2", "parallel.vpp=2", "model.llm.num_layers=6",
             "parallel.first_stage_layers=4").validate(2)
    _compose("+experiment=tiny_qwen3_vl_moe", "parallel.pp=2", "parallel.vpp=2", "model.llm.num_layers=8",
             "parallel.first_stage_layers=4", "parallel.ep=2", "train.global_batch_tokens=4096",
             "optim.distributed=true").validate(4)


def test_experts_train_with_the_distributed_optimizer():
    """optim.distributed=true with a MoE model at ep=2 and at tp=2+sp × ep=2 (experts sharded over their
    own expert-data-parallel group)."""
    _compose("+experiment=tiny_qwen3_vl_moe", "parallel.ep=2", "optim.distributed=true").validate(2)
    _compose("+experiment=tiny_qwen3_vl_moe", "parallel.tp=2", "parallel.sp=true", "parallel.ep=2",
             "optim.distributed=true").validate(4)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.generation=qwen9_vl", "model.generation"),
        ("stage.name=stage9", "stage"),
        ("wandb.mode=loud", "wandb.mode"),
        ("checkpoint.resume=maybe", "checkpoint.resume"),
        ("model.llm.mrope_section=[4,4,4]", "mrope_section"),
    ],
)
def test_field_validation_errors(override, key):
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        _compose("+experiment=tiny", override)


def test_unknown_generation_lists_the_valid_ones():
    with pytest.raises(Exception, match="qwen2_5_vl"):
        _compose("model.generation=nope")


def _launch(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_dry_run_prints_config_and_layout_and_builds_nothing(tmp_path, data_root):
    proc = _launch("+experiment=tiny", "dry_run=true", f"output_dir={tmp_path / 'run'}", f"cluster.data_root={data_root}")
    assert proc.returncode == 0, proc.stderr
    assert "layout      world=1 = tp 1 × pp 1 × cp 1 × dp 1" in proc.stdout
    assert "max_tokens: 1024" in proc.stdout
    assert not list((tmp_path / "run").glob("*")) if (tmp_path / "run").exists() else True  # Hydra's run dir only


def test_bad_layout_fails_before_any_process_group(tmp_path, data_root):
    proc = _launch("+experiment=tiny", "parallel.tp=2", f"output_dir={tmp_path / 'run'}", f"cluster.data_root={data_root}")
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "parallel.tp" in proc.stderr
    assert not list((tmp_path / "run").glob("*")) if (tmp_path / "run").exists() else True  # Hydra's run dir only


def test_architecture_overrides_are_told_apart_from_run_keys():
    from qvl_train.config import is_arch_override

    for o in ("model=qwen2_vl/7b", "+model=qwen2_vl/7b", "model.generation=qwen3_vl", "model.llm.num_layers=4",
              "++model.vision.depth=2", "~model.vision.window_size", "model.llm={num_layers: 2}"):
        assert is_arch_override(o), o
    for o in ("model.init_from=/ckpt", "model.lora.rank=8", "model.attention_backend=flex", "model.init_std=0.01",
              "+experiment=tiny", "data.max_tokens=512", "models=x"):
        assert not is_arch_override(o), o


def test_unknown_model_choice_names_the_valid_ones():
    from qvl_train.config import model_choice_error

    configs = ROOT / "configs"
    assert model_choice_error(["+experiment=tiny", "model=qwen2_vl/7b"], configs) is None
    assert "valid: qwen3_vl/2b, qwen3_vl/32b, qwen3_vl/4b, qwen3_vl/8b, qwen3_vl/tiny" in model_choice_error(
        ["model=qwen3_vl/9b"], configs)
    assert "model=qwen2_vl needs a size; valid: qwen2_vl/2b" in model_choice_error(["model=qwen2_vl"], configs)
    assert "no model generation 'qwen4'" in model_choice_error(["model=qwen4/7b"], configs)
