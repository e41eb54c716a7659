"""Layout planner: hand counts, the direction of every lever, layout rules, and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qvl_train.config import LLMConfig, ModelConfig, VisionConfig
from qvl_train.models.params import count_parameters
from qvl_train.tools.planner import BF16_MIXED, GPUS, GiB, Layout, Workload, check_layout, plan, predict
from tests.conftest import ROOT, clean_env

H100 = GPUS["h100"]


def _dense(layers=8, h=1024, vocab=32000) -> ModelConfig:
    return ModelConfig(
        generation="qwen2_vl",
        vision=VisionConfig(depth=2, hidden_size=256, num_heads=4, mlp_ratio=4.0),
        llm=LLMConfig(num_layers=layers, hidden_size=h, ffn_hidden_size=4 * h, num_attention_heads=16,
                      num_query_groups=4, vocab_size=vocab, head_dim=64, mrope_section=[8, 12, 12]),
    )


def _moe() -> ModelConfig:
    cfg = _dense(layers=8)
    cfg.generation = "qwen3_vl_moe"
    cfg.llm.num_experts, cfg.llm.moe_ffn_hidden_size, cfg.llm.moe_router_topk = 16, 512, 4
    return cfg


def _lo(**kw) -> Layout:
    base = dict(tp=1, pp=1, vpp=1, ep=1, etp=1, cp=1, dp=1, recompute="none")
    return Layout(**{**base, **kw})


WORK = Workload(micro_tokens=4096, global_tokens=4096 * 16)


def test_static_memory_is_the_hand_count():
    cfg = _dense()
    n = count_parameters(cfg)["total"]
    pred = predict(cfg, _lo(), WORK, H100)
    assert pred.memory_gib["weights"] * GiB == pytest.approx(2 * n, rel=1e-9)  # bf16
    assert pred.memory_gib["grads"] * GiB == pytest.approx(4 * n, rel=1e-9)  # fp32 grad buffer
    assert pred.memory_gib["optimizer"] * GiB == pytest.approx(12 * n, rel=1e-9)  # master + 2 moments
    sharded = predict(cfg, _lo(dp=4), WORK, H100)
    assert sharded.memory_gib["optimizer"] == pytest.approx(pred.memory_gib["optimizer"] / 4)  # distributed optimizer
    assert sharded.memory_gib["weights"] == pred.memory_gib["weights"]


def test_every_lever_moves_memory_the_right_way():
    cfg = _dense()
    base = predict(cfg, _lo(), WORK, H100).memory_gib
    tp = predict(cfg, _lo(tp=2), WORK, H100).memory_gib
    assert tp["weights"] < base["weights"] and tp["activations"] == pytest.approx(base["activations"] / 2)
    full = predict(cfg, _lo(recompute="full"), WORK, H100).memory_gib
    sel = predict(cfg, _lo(recompute="selective"), WORK, H100).memory_gib
    assert full["activations"] < sel["activations"] < base["activations"]
    cp = predict(cfg, _lo(cp=2), WORK, H100).memory_gib
    assert cp["activations"] == pytest.approx(base["activations"] / 2)
    pp = predict(cfg, _lo(pp=2), Workload(4096, 4096 * 16), H100)
    assert pp.memory_gib["weights"] < base["weights"] and pp.time_s["bubble"] > 0


def test_step_flops_are_6nt_for_a_plain_llm():
    """No visual tokens, label share 1, attention negligible (tiny micro-batch): 6·N·T, N without the input embedding."""
    from qvl_train.tools.planner import _step_flops

    cfg = _dense(layers=4, h=512, vocab=1000)
    work = Workload(micro_tokens=1, global_tokens=1_000_000, visual_share=0.0, label_share=1.0)
    n = count_parameters(cfg)["llm"] - cfg.llm.vocab_size * cfg.llm.hidden_size  # input embedding: a lookup
    assert _step_flops(cfg, work) == pytest.approx(6 * n * work.global_tokens, rel=1e-3)


def test_experts_shard_over_ep_and_expert_data_parallel():
    cfg = _moe()
    one = predict(cfg, _lo(dp=8), WORK, H100)
    ep = predict(cfg, _lo(dp=8, ep=4), WORK, H100)
    assert ep.memory_gib["weights"] < one.memory_gib["weights"]
    assert ep.time_s["ep_comm"] > 0 == one.time_s["ep_comm"]


@pytest.mark.parametrize("layout, message", [
    (dict(tp=3, dp=1), "does not divide the 16 heads"),
    (dict(tp=8, dp=1), "4 kv groups"),
    (dict(pp=3, vpp=2, dp=1), "equal chunks"),
    (dict(ep=3, dp=3), "does not divide the 16 experts"),
    (dict(ep=8, dp=4), "ep·etp=8 does not divide the tp·cp·dp=4"),
])
def test_layout_rules(layout, message):
    assert message in check_layout(_moe(), _lo(**layout), WORK)


def test_plan_returns_fitting_layouts_fastest_first():
    cfg = _dense(layers=16, h=2048)
    best = plan(cfg, 16, WORK, H100, top=5)
    assert best and all(p.fits for p in best)
    assert [p.step_s for p in best] == sorted(p.step_s for p in best)
    assert all(p.layout.tp * p.layout.pp * p.layout.cp * p.layout.dp == 16 for p in best)
    tiny_gpu = type(H100)("tiny", 1, 989, 360, 45)
    assert plan(cfg, 16, WORK, tiny_gpu) == []  # nothing fits in 1 GiB
    assert BF16_MIXED.optimizer == 12


def test_cli_plans_the_235b_experiment_and_compares_the_published_recipe():
    proc = subprocess.run(
        [sys.executable, "launch/plan.py", "+experiment=qwen3vl_235b_thinking", "cluster.gpus=256", "--top", "3"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert "## Fastest layouts that fit" in out and "Published: Megatron recipe" in out, out + proc.stderr
    assert "tp2 pp8 vpp4 ep32 dp16" in out and "Why " in out
    rows = [l for l in out.splitlines() if l.startswith("| tp")]
    assert len(rows) >= 3 + 1 + 2
    bad = subprocess.run([sys.executable, "launch/plan.py", "+experiment=qwen3vl_235b_thinking", "cluster.gpus=0"],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cluster.gpus=N" in bad.stderr
