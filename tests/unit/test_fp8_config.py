"""What Transformer Engine's FP8 needs of a run, refused at validation (before any process group starts):
the packed length (`data.max_tokens`, per rank under sequence parallelism) in multiples of 16, and no
hybrid LLM layers (always on the local spec, where TE's FP8 would silently not apply). The torch
backend pads inside its GEMMs and runs in the local layers, so it takes both."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from qvl_train.config import ConfigError, DataConfig, ParallelConfig, TrainConfig, TrainLoopConfig, register_configs, to_train_config
from tests.conftest import ROOT


@pytest.fixture
def fp8_machine(monkeypatch):
    """A machine where FP8 can run: TE installed, an H100."""
    from qvl_train.models import specs

    monkeypatch.setattr(specs, "te_available", lambda: True)
    monkeypatch.setattr(specs, "gpu_fp8_capable", lambda: (True, "NVIDIA H100 (compute capability 9.0)"))


def _cfg(fp8="hybrid", backend="te", max_tokens=2048, tp=1, sp=False) -> TrainConfig:
    return TrainConfig(train=TrainLoopConfig(fp8=fp8, fp8_backend=backend), data=DataConfig(max_tokens=max_tokens),
                       parallel=ParallelConfig(tp=tp, sp=sp))


def test_te_fp8_packed_length_multiple_of_16(fp8_machine):
    _cfg(max_tokens=2048)._validate_optim_and_precision()
    with pytest.raises(ConfigError, match=r"train.fp8=hybrid \(train.fp8_backend=te\) needs the packed length in multiples "
                                          r"of 16: data.max_tokens=2050; set data.max_tokens=2064 .*train.fp8_backend=torch"):
        _cfg(max_tokens=2050)._validate_optim_and_precision()
    # sequence parallelism: max_tokens / tp rows per rank, each a multiple of 16
    _cfg(max_tokens=2048, tp=4, sp=True)._validate_optim_and_precision()
    with pytest.raises(ConfigError, match=r"rows per rank under parallel.sp.*set data.max_tokens=2112 \(a multiple of 64"):
        _cfg(max_tokens=2056, tp=4, sp=True)._validate_optim_and_precision()
    _cfg(max_tokens=2064, tp=4, sp=False)._validate_optim_and_precision()  # no SP: every rank has all 2064 rows
    # auto refuses only where it would turn TE FP8 on; e4m3 like hybrid
    with pytest.raises(ConfigError, match=r"train.fp8=auto \(train.fp8_backend=te\)"):
        _cfg(fp8="auto", max_tokens=2050)._validate_optim_and_precision()
    with pytest.raises(ConfigError, match=r"train.fp8=e4m3"):
        _cfg(fp8="e4m3", max_tokens=2050)._validate_optim_and_precision()
    # the torch backend pads every GEMM operand to 16 itself (models/fp8.py `_scaled_gemm`); FP8 off: nothing asked
    _cfg(backend="torch", max_tokens=2050, tp=4, sp=False)._validate_optim_and_precision()
    _cfg(fp8="off", max_tokens=2050)._validate_optim_and_precision()


def test_te_fp8_auto_off_needs_nothing(monkeypatch):
    from qvl_train.models import specs

    monkeypatch.setattr(specs, "te_available", lambda: False)  # auto stays off: no layout asked of the run
    _cfg(fp8="auto", max_tokens=2050)._validate_optim_and_precision()


def test_te_fp8_with_hybrid_layers_is_refused(fp8_machine):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        raw = compose("train", overrides=["+experiment=tiny_qwen3_5", "train.fp8=hybrid", "train.fp8_backend=te"])
    cfg = to_train_config(raw)
    assert cfg.model.llm.layer_types and cfg.data.max_tokens % 16 == 0
    with pytest.raises(ConfigError, match=r"hybrid LLM layers \(model.llm.layer_types\).*local spec.*stay bf16; "
                                          r"set train.fp8_backend=torch"):
        cfg._validate_optim_and_precision()
    cfg.train.fp8 = "auto"  # would turn on here: refused the same way
    with pytest.raises(ConfigError, match="hybrid LLM layers"):
        cfg._validate_optim_and_precision()
    cfg.train.fp8, cfg.train.fp8_backend = "hybrid", "torch"
    cfg._validate_optim_and_precision()
