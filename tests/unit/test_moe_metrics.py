"""MoE metrics: `loss/moe_aux` and the per-layer expert load in metrics.jsonl, a histogram per layer in wandb."""

from __future__ import annotations

import pytest

from qvl_train.engines.base import StepResult
from qvl_train.monitor.metrics import moe_record, train_record


def _result(**kw) -> StepResult:
    return StepResult(
        loss=2.0, grad_norm=1.0, module_grad_norms={"llm": 1.0}, tokens=10, label_tokens=8, samples=2,
        visual_tokens=4, slots=12, **kw,
    )


def test_moe_record_keeps_the_aux_loss_apart_from_the_lm_loss():
    r = train_record(
        3, _result(moe_aux_loss=0.002, expert_load={0: [3.0, 1.0, 0.0, 4.0], 1: [2.0, 2.0, 2.0, 2.0]}), lr=1e-3,
        step_time_s=1.0, data_s=0.0, checkpoint_s=0.0, world_size=1, peak_tflops=None, skipped_steps=0,
    )
    assert r["loss"] == r["lm_loss"] == 2.0 and r["loss/moe_aux"] == 0.002
    assert r["moe/expert_load/layer_0"] == [3.0, 1.0, 0.0, 4.0] and "moe/expert_load/layer_1" in r
    assert moe_record(_result()) == {}  # dense models: no MoE keys


def test_expert_load_becomes_a_wandb_histogram_with_one_bin_per_expert():
    wandb = pytest.importorskip("wandb")
    from qvl_train.monitor.wandb import _wandb_value

    h = _wandb_value("moe/expert_load/layer_0", [3.0, 1.0, 0.0, 4.0])
    assert isinstance(h, wandb.Histogram)
    assert list(h.histogram) == [3.0, 1.0, 0.0, 4.0] and list(h.bins) == [0, 1, 2, 3, 4]
    assert _wandb_value("loss/moe_aux", 0.5) == 0.5
