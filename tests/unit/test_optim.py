"""Optimizer and precision knobs: per-module learning rates, the WSD schedule, activation
recomputation and the FP8 decision — schedule values, param groups, config errors, and real steps
of the tiny model in one process."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from qvl_train.config import ConfigError, OptimConfig, TrainConfig, TrainLoopConfig
from qvl_train.engines.common import lr_at, module_lrs, param_groups
from qvl_train.monitor.metrics import lr_record
from tests.conftest import megatron_one_rank_world  # noqa: E402


# ------------------------------------------------------------------ per-module learning rates
def test_module_lrs_share_the_schedule_shape():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, lr_vit=2e-4, lr_projector=5e-3, warmup_steps=10, schedule="cosine")
    ratio = {"llm": 1.0, "vision": 0.2, "projector": 5.0}
    for step, llm in ((0, 1e-4), (4, 5e-4), (9, 1e-3), (10, 1e-3), (55, 5.5e-4), (100, 1e-4)):
        lrs = module_lrs(step, cfg, max_steps=100)
        assert lrs["llm"] == pytest.approx(llm)
        for m, r in ratio.items():
            assert lrs[m] == pytest.approx(llm * r), (step, m)  # warmup, peak and floor all scale
    assert module_lrs(3, OptimConfig(lr=1e-3), 100) == {m: lr_at(3, OptimConfig(lr=1e-3), 100) for m in ratio}


def test_param_groups_split_modules_and_weight_decay():
    def p(*shape):
        return torch.nn.Parameter(torch.zeros(shape))

    named = [
        ("vision.decoder.layers.0.mlp.linear_fc1.weight", p(4, 4)),
        ("vision.decoder.layers.0.mlp.linear_fc1.bias", p(4)),
        ("projector.ln_q.weight", p(4)),
        ("projector.mlp.0.weight", p(4, 4)),
        ("llm.embedding.word_embeddings.weight", p(8, 4)),
        ("llm.decoder.final_layernorm.weight", p(4)),
        ("llm.decoder.layers.0.self_attention.linear_qkv.bias", p(4)),
    ]
    named[3][1].requires_grad_(False)  # a frozen parameter joins no group
    cfg = OptimConfig(lr=1e-3, lr_vit=0.0, weight_decay=0.1)
    groups = param_groups(named, cfg)
    by = {(g["module"], g["weight_decay"]): (g["lr"], [id(x) for x in g["params"]]) for g in groups}
    ids = {n: id(t) for n, t in named}
    assert groups[0]["module"] == "llm"
    assert by[("llm", 0.1)] == (1e-3, [ids["llm.embedding.word_embeddings.weight"]])
    assert by[("llm", 0.0)][1] == [ids["llm.decoder.final_layernorm.weight"],
                                   ids["llm.decoder.layers.0.self_attention.linear_qkv.bias"]]
    assert by[("vision", 0.1)] == (0.0, [ids["vision.decoder.layers.0.mlp.linear_fc1.weight"]])
    assert by[("vision", 0.0)] == (0.0, [ids["vision.decoder.layers.0.mlp.linear_fc1.bias"]])
    assert by[("projector", 0.0)] == (1e-3, [ids["projector.ln_q.weight"]])
    assert ("projector", 0.1) not in by  # empty groups are dropped


def test_lr_record_names_differing_modules_only():
    assert lr_record(1.0, {}) == {"lr": 1.0}
    assert lr_record(9.0, {"llm": 1.0, "vision": 1.0, "projector": 1.0}) == {"lr": 1.0}
    assert lr_record(9.0, {"llm": 1.0, "vision": 0.0, "projector": 2.0}) == {"lr": 1.0, "lr/vision": 0.0, "lr/projector": 2.0}


# ------------------------------------------------------------------------------ WSD schedule
@pytest.mark.parametrize("style,mid", [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5))])
def test_wsd_boundaries(style, mid):
    # 100 steps, warmup 10, decay over the last 20 (steps 80..99): progress (step - 79) / 20.
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2, decay_style=style)
    at = lambda s: lr_at(s, cfg, 100)  # noqa: E731
    assert at(0) == pytest.approx(0.1) and at(9) == pytest.approx(1.0)  # warmup ends at the peak
    assert at(10) == at(50) == at(79) == 1.0  # stable
    assert at(80) < 1.0  # the decay starts with the last 20 steps
    assert at(89) == pytest.approx(0.1 + 0.9 * mid)  # half-way
    assert at(99) == pytest.approx(0.1) and at(150) == pytest.approx(0.1)  # min_lr at the last step
    assert all(at(s) >= at(s + 1) for s in range(10, 99))
    half = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2,
                       decay_style=style, lr_vit=0.5)
    assert module_lrs(89, half, 100)["vision"] == pytest.approx(0.5 * at(89))


def test_wsd_default_fraction_and_config_errors():
    cfg = OptimConfig(lr=1.0, schedule="wsd")  # decay_fraction 0.1, linear
    assert lr_at(89, cfg, 100) == 1.0 and lr_at(90, cfg, 100) == pytest.approx(0.9)
    for bad in ({"decay_style": "exp"}, {"decay_fraction": 0.0}, {"decay_fraction": 1.5}, {"schedule": "step"},
                {"lr_vit": -1.0}, {"lr_projector": -1e-3}, {"min_lr": 2.0, "lr": 1.0}):
        with pytest.raises(ConfigError, match="optim\\."):
            OptimConfig(**bad)
    tc = TrainConfig(optim=OptimConfig(schedule="wsd", warmup_steps=95, decay_fraction=0.1),
                     train=TrainLoopConfig(max_steps=100))
    with pytest.raises(ConfigError, match="optim.warmup_steps=95 overlaps the WSD decay"):
        tc._validate_optim_and_precision()


# --------------------------------------------------------------------------------------- FP8
def _gpu(capable: bool):
    return lambda: (capable, "NVIDIA H100 (compute capability 9.0)" if capable else "NVIDIA A100 (compute capability 8.0)")


@pytest.mark.parametrize("te,gpu", [(False, False), (True, False), (False, True)])
def test_explicit_fp8_without_te_or_gpu_is_a_config_error(monkeypatch, te, gpu):
    from qvl_train.models import specs

    monkeypatch.setattr(specs, "te_available", lambda: te)
    monkeypatch.setattr(specs, "gpu_fp8_capable", _gpu(gpu))
    for mode in ("hybrid", "e4m3"):
        tc = TrainConfig(train=TrainLoopConfig(fp8=mode))
        with pytest.raises(ConfigError, match=f"train.fp8={mode} .*needs .*use train.fp8=off") as err:
            tc._validate_optim_and_precision()
        assert ("Transformer Engine" in str(err.value)) == (not te)
        assert ("compute capability >= 8.9; here: NVIDIA A100" in str(err.value)) == (not gpu)
    TrainConfig(train=TrainLoopConfig(fp8="auto"))._validate_optim_and_precision()  # auto never fails
    with pytest.raises(ConfigError, match="train.fp8='fp4'"):
        TrainLoopConfig(fp8="fp4")


def test_fp8_auto_decision(monkeypatch, caplog):
    from qvl_train.models import specs

    monkeypatch.setattr(specs, "te_available", lambda: True)
    monkeypatch.setattr(specs, "gpu_fp8_capable", _gpu(True))
    assert specs.resolve_fp8("auto") == ("hybrid", None)
    assert specs.resolve_fp8("e4m3") == ("e4m3", None) and specs.resolve_fp8("off") == (None, None)
    TrainConfig(train=TrainLoopConfig(fp8="hybrid"))._validate_optim_and_precision()  # TE + GPU: fine
    monkeypatch.setattr(specs, "te_available", lambda: False)
    with caplog.at_level(logging.INFO, logger=specs.__name__):
        assert specs.resolve_fp8("auto") == (None, None)
    notes = [r.getMessage() for r in caplog.records if "FP8 is off" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("train.fp8=auto: FP8 is off (missing: Transformer Engine")


def test_execution_sets_transformer_config_fields():
    from qvl_train.models.common import Execution

    assert Execution().transformer_kwargs() == {}
    assert Execution("selective").transformer_kwargs() == {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    assert Execution("full", fp8="hybrid").transformer_kwargs() == {
        "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1, "fp8": "hybrid"}
    with pytest.raises(ConfigError, match="train.recompute='some'"):
        TrainLoopConfig(recompute="some")


# ------------------------------------------------------------- one-process steps of the tiny model
def _one_rank_dims():
    from qvl_train.parallel.dims import ParallelDims, megatron_groups

    megatron_one_rank_world()
    dims = ParallelDims(tp=1, pp=1, cp=1, dp=1, world_size=1)
    dims.groups = megatron_groups()
    return dims


def test_lr_vit_zero_keeps_the_vit_while_the_llm_moves():
    from qvl_train.config import ParallelConfig, StageConfig
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.models.tiny import packed_batch, tiny_model_config

    dims = _one_rank_dims()
    cfg = tiny_model_config()
    optim = OptimConfig(lr=1e-3, lr_vit=0.0, lr_projector=5e-4, warmup_steps=0, schedule="constant")
    engine = MegatronEngine(cfg, ParallelConfig(), optim, StageConfig("stage2_multitask"), dims, seed=3, max_steps=5)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    result = engine.train_step([packed_batch(cfg)], 0)
    assert not result.skipped and result.module_grad_norms["vision"] > 0  # the ViT did get gradients
    moved = {n: not torch.equal(before[n], p.detach()) for n, p in engine.model.named_parameters()}
    assert not any(v for n, v in moved.items() if n.startswith("vision."))
    assert all(v for n, v in moved.items() if n.startswith(("llm.", "projector.")) and "embedding" not in n)
    assert result.lrs == {"vision": 0.0, "projector": 5e-4, "llm": 1e-3}
    assert {g["module"]: g["lr"] for g in engine.optimizer.param_groups} == result.lrs
    # AdamW state is kept per parameter name: a run with other groups (ViT frozen, one lr) resumes it
    state = engine.sharded_state_dict()["optimizer"]
    assert set(state) == {"steps"} | {f"{n}.{m}" for n in before for m in ("exp_avg", "exp_avg_sq")}
    other = MegatronEngine(cfg, ParallelConfig(), OptimConfig(lr=1e-3), StageConfig("stage3_sft"), dims,
                           seed=4, max_steps=5)
    assert len(other.optimizer.param_groups) == 4 < len(engine.optimizer.param_groups) == 6
    other.load_sharded({"model": engine.model.state_dict(), "optimizer": {k: v.data for k, v in state.items() if k != "steps"}},
                       with_optimizer=True)
    mine = dict(engine.model.named_parameters())
    for name, p in other.model.named_parameters():
        assert torch.equal(p, mine[name])
        if p.requires_grad:
            assert torch.equal(other.optimizer.state[p]["exp_avg_sq"], engine.optimizer.state[mine[name]]["exp_avg_sq"])


def _saved_bytes_loss_grads(recompute: str, cfg):
    """(bytes of activations autograd saved for the backward, loss, {name: grad}) of one forward/backward.

    Counted once per storage, without parameters and the vocabulary-wide logits / cross-entropy
    tensors (they dwarf a tiny model's layers and no recompute mode touches them)."""
    from qvl_train.config import ParallelConfig
    from qvl_train.models import Execution, build_model, init_weights
    from qvl_train.models.tiny import packed_batch

    model = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True, execution=Execution(recompute))
    init_weights(model, seed=7, std=0.02)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and cfg.llm.vocab_size not in t.shape:  # weights and [n, V] logits are the same in every mode
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    batch = packed_batch(cfg)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch).sum() / batch.num_label_tokens
    loss.backward()
    return sum(seen.values()), float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen3_vl"])  # TransformerBlock loop; run_layer (ViT + DeepStack LLM)
def test_recompute_gives_identical_gradients_with_fewer_saved_tensors(generation, capsys):
    from qvl_train.models import tiny

    megatron_one_rank_world()
    make = {"qwen2_vl": tiny.tiny_model_config, "qwen3_vl": tiny.tiny_qwen3_vl_config}[generation]
    runs = {mode: _saved_bytes_loss_grads(mode, make()) for mode in ("none", "selective", "full")}
    saved0, loss0, grads0 = runs["none"]
    for mode in ("selective", "full"):
        saved, loss, grads = runs[mode]
        assert loss == pytest.approx(loss0, abs=1e-6)
        for n, g in grads0.items():
            assert torch.allclose(grads[n], g, atol=1e-6, rtol=0), (mode, n, float((grads[n] - g).abs().max()))
    assert runs["full"][0] < runs["selective"][0] < saved0
    with capsys.disabled():
        print(f"\n[{generation}] saved activation bytes: " + ", ".join(f"{m}={r[0]}" for m, r in runs.items()))
