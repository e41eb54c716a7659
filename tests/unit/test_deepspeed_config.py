"""engine=deepspeed: what it refuses (before any process group) and the DeepSpeed config it builds."""

from __future__ import annotations

import pytest
import torch

from qvl_train.config import ConfigError, EngineConfig, OptimConfig
from tests.unit.test_config import _compose


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tp=2"], r"parallel\.tp=2 with engine=deepspeed.*set parallel\.tp=1, or use engine=megatron"),
        (["parallel.pp=2"], r"parallel\.pp=2 with engine=deepspeed"),
        (["parallel.cp=2"], r"parallel\.cp=2 with engine=deepspeed"),
        (["+experiment=tiny_qwen3_vl_moe", "parallel.ep=2"], r"parallel\.ep=2 with engine=deepspeed"),
        (["+experiment=tiny_qwen3_vl_moe"], r"mixture-of-experts model is not available with engine=deepspeed"),
        (["model.lora.rank=8"], r"model\.lora is not available with engine=deepspeed"),
        (["optim.distributed=true"], r"optim\.distributed=true is not available with engine=deepspeed"),
    ],
)
def test_deepspeed_refuses_what_it_cannot_run(overrides, message):
    experiment = next((o for o in overrides if o.startswith("+")), "+experiment=tiny")
    cfg = _compose(experiment, "engine=deepspeed", *(o for o in overrides if not o.startswith("+")))
    with pytest.raises(ConfigError, match=message):
        cfg.validate(4)


def test_engine_options_are_checked():
    for bad in (dict(name="fsdp"), dict(zero_stage=1), dict(offload_optimizer="nvme"), dict(param_persistence_threshold=-1)):
        with pytest.raises(ConfigError):
            EngineConfig(**bad)
    cfg = _compose("+experiment=tiny", "engine=deepspeed", "engine.zero_stage=3", "engine.offload_optimizer=cpu")
    cfg.validate(2)
    assert (cfg.engine.name, cfg.engine.zero_stage, cfg.engine.offload_optimizer) == ("deepspeed", 3, "cpu")


def test_deepspeed_config_follows_our_config():
    from qvl_train.engines.deepspeed import deepspeed_config

    optim = OptimConfig(clip_grad=0.7)
    ds = deepspeed_config(EngineConfig(name="deepspeed", zero_stage=3, offload_optimizer="cpu", param_persistence_threshold=0),
                          optim, torch.bfloat16, micro_per_rank=4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and not ds["zero_force_ds_cpu_optimizer"]
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.7
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (1, 4)
    ds = deepspeed_config(EngineConfig(name="deepspeed"), optim, torch.float32, micro_per_rank=1)
    assert ds["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in ds["zero_optimization"]
    assert not ds["bf16"]["enabled"]


def test_megatron_engine_refuses_a_deepspeed_bf16_optimizer_state_by_name():
    from types import SimpleNamespace

    from qvl_train.engines.megatron import MegatronEngine

    engine = SimpleNamespace(optimizer_format="per_param")
    with pytest.raises(RuntimeError, match="engine=deepspeed train.dtype=bf16.*model.init_from"):
        MegatronEngine.check_optimizer_format(engine, "deepspeed_bf16")
    with pytest.raises(RuntimeError, match="optim.distributed=true"):
        MegatronEngine.check_optimizer_format(engine, "distributed")
