"""LoRA (`models/lora.py`): config checks, step 0 = base model, only adapters train (no gradient and no
optimizer state for frozen weights), checkpoints (resume, init_from a full checkpoint), merged and PEFT
export against the HF model in fp32, and tp = 2 against tp = 1 (one 2-process gloo spawn)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from qvl_train.compat.megatron_cpu import spawn_gloo
from qvl_train.config import ConfigError, LoRAConfig, OptimConfig, ParallelConfig, StageConfig, TrainConfig
from qvl_train.models.tiny import packed_batch, tiny_model_config
from tests.unit.test_optim import _one_rank_dims

LORA = LoRAConfig(rank=4, alpha=8.0)


def _lora_cfg(**lora):
    cfg = tiny_model_config()
    cfg.lora = replace(LORA, **lora)
    return cfg


def _fill_b(model, seed: int = 11, std: float = 0.05) -> None:
    """Non-zero B factors, the same full tensors in every layout (init_weights' generator, another key)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from qvl_train.models import _init_sharded

    for item in nested_values(model.sharded_state_dict()):
        for st in nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]:
            if st.key.endswith("lora_B"):
                _init_sharded(replace(st, key=st.key + ".test"), seed, std)


def hf_kwargs(batch) -> dict:
    """HF `forward` arguments for the real tokens of a `PackedBatch` (4-row positions: packed samples)."""
    n, cu = batch.num_tokens, batch.cu_seqlens.tolist()
    text_pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    return dict(input_ids=batch.input_ids[None, :n], attention_mask=None, use_cache=False,
                position_ids=torch.cat([text_pos[None], batch.position_ids[:, :n]])[:, None, :],
                pixel_values=batch.pixel_values, image_grid_thw=batch.grid_thw)


# ------------------------------------------------------------------------------------------ config
def test_lora_config_is_checked():
    assert not LoRAConfig().enabled and LORA.scale == 2.0
    with pytest.raises(ConfigError, match="model.lora.rank=-1"):
        LoRAConfig(rank=-1)
    with pytest.raises(ConfigError, match="model.lora.targets.*'q_proj' unknown"):
        LoRAConfig(rank=8, targets=["q_proj"])
    with pytest.raises(ConfigError, match="model.lora.modules"):
        LoRAConfig(rank=8, modules=["llm", "llm"])
    with pytest.raises(ConfigError, match="model.lora.alpha"):
        LoRAConfig(rank=8, alpha=0)
    cfg = TrainConfig()
    cfg.model = _lora_cfg(modules=["llm"])
    cfg.stage = StageConfig("stage1_align")
    cfg.data.generation = cfg.model.generation
    with pytest.raises(ConfigError, match="nothing would train"):
        cfg.validate(1)
    cfg.stage = StageConfig("stage3_sft")
    cfg.validate(1)
    cfg.train.fp8 = "hybrid"
    with pytest.raises(ConfigError, match="train.fp8=hybrid with model.lora"):
        cfg.validate(1)
    cfg.train.fp8 = "off"
    cfg.parallel = ParallelConfig(tp=2, sp=True)
    with pytest.raises(ConfigError, match="model.lora with parallel.sp=true"):
        cfg.validate(2)
    from qvl_train.models.tiny import tiny_qwen3_vl_moe_config

    cfg.model = tiny_qwen3_vl_moe_config(lora=LORA)  # MoE: experts over parallel.ep, tensor parallelism refused
    cfg.data.generation = cfg.model.generation
    cfg.parallel = ParallelConfig(ep=2)
    cfg.validate(2)
    for parallel in (ParallelConfig(tp=2, sp=True, ep=2), ParallelConfig(etp=2)):
        cfg.parallel = parallel
        with pytest.raises(ConfigError, match="mixture-of-experts model runs at parallel.tp=1 parallel.etp=1"):
            cfg.validate(2)


# ------------------------------------------------------------------ one process: freezing, checkpoints
def test_hydra_overrides_and_defaults():
    from tests.unit.test_config import _compose

    cfg = _compose("+experiment=tiny", "model.lora.rank=8", "model.lora.modules=[llm]")
    assert cfg.model.lora == LoRAConfig(rank=8, modules=["llm"])
    from qvl_train.models import build_model
    from qvl_train.models.lora import lora_layers
    from tests.conftest import megatron_one_rank_world

    megatron_one_rank_world()
    model = build_model(_lora_cfg(), ParallelConfig(), pre_process=True, post_process=True)
    assert {n.split(".")[0] for n in lora_layers(model)} == {"llm", "projector"}  # the ViT only when listed
    assert "llm.output_layer" not in lora_layers(model)


def _engine(cfg, seed=3):
    from qvl_train.engines.megatron import MegatronEngine

    optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    return MegatronEngine(cfg, ParallelConfig(), optim, StageConfig("stage2_multitask"), _one_rank_dims(), seed=seed, max_steps=5)


ALL = dict(modules=["llm", "projector", "vision"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base engine, a LoRA engine (adapters in all three towers) after one step, and their checkpoints
    (`full/`, `lora/`: manager layout + model_config.json, as import-hf writes)."""
    from dataclasses import asdict

    from qvl_train.checkpoint.manager import CheckpointManager, TrainState

    tmp = tmp_path_factory.mktemp("lora")
    base, engine = _engine(tiny_model_config()), _engine(_lora_cfg(**ALL))
    batch = packed_batch(tiny_model_config())
    with torch.no_grad():  # B = 0: step 0 is the base model
        step0 = (engine.model(batch), base.model(batch))
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    result = engine.train_step([batch], 0)
    for name, eng in (("full", base), ("lora", engine)):
        CheckpointManager(tmp / name, _one_rank_dims()).save(eng, TrainState(step=1))
        (tmp / name / "model_config.json").write_text(json.dumps(asdict(eng.model_cfg)))
    engine.model.eval()
    with torch.no_grad():  # the logits of the saved LoRA model (later tests step the engine on)
        logits = engine.model.logits(batch).float()[: batch.num_tokens]
    engine.model.train()
    return dict(logits=logits, base=base, engine=engine, batch=batch, step0=step0, before=before, result=result, tmp=tmp)


def test_only_adapters_train(trained):
    engine, result = trained["engine"], trained["result"]
    torch.testing.assert_close(*trained["step0"], rtol=0, atol=0)
    trainable = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert {n.split(".")[0] for n in trainable} == {"llm", "projector", "vision"}
    n_lora = sum(p.numel() for n, p in engine.model.named_parameters() if n in trainable)
    assert engine.parameter_counts() == (n_lora, sum(p.numel() for p in engine.model.parameters()))
    assert not result.skipped and result.grad_norm > 0
    for n, p in engine.model.named_parameters():
        assert (n in trainable) == (p.grad is not None), n  # frozen weights: no gradient at all
        # frozen weights stay; B moves; A (zero gradient while B = 0) moves from the second step
        assert torch.equal(p, trained["before"][n]) == (n not in trainable or n.endswith("lora_A")), n
    names = {id(p): n for n, p in engine.model.named_parameters()}
    assert {names[id(p)] for g in engine.optimizer.param_groups for p in g["params"]} == trainable
    assert {names[id(p)] for p in engine.optimizer.state} == trainable  # no optimizer state for frozen weights
    sharded_opt = engine.sharded_state_dict()["optimizer"]
    assert set(sharded_opt) == {"steps"} | {f"{n}.{m}" for n in trainable for m in ("exp_avg", "exp_avg_sq")}


def test_init_from_a_full_checkpoint_then_resume(trained, caplog):
    from qvl_train.checkpoint.manager import CheckpointManager

    tmp, batch, engine = trained["tmp"], trained["batch"], trained["engine"]
    fresh = _engine(_lora_cfg(**ALL), seed=9)
    state, how = CheckpointManager(tmp / "run", _one_rank_dims()).restore(fresh, resume="never", init_from=str(tmp / "full"))
    assert state.step == 0 and "initialised" in how
    with torch.no_grad():  # the full checkpoint's weights, adapters fresh (B = 0)
        torch.testing.assert_close(fresh.model(batch), trained["base"].model(batch), rtol=0, atol=0)
    state, how = CheckpointManager(tmp / "lora", _one_rank_dims()).restore(fresh, resume="auto", init_from=None)
    assert state.step == 1 and "resumed" in how
    mine = dict(engine.model.named_parameters())
    for n, p in fresh.model.named_parameters():
        assert torch.equal(p, mine[n]), n
        if p.requires_grad:
            assert torch.equal(fresh.optimizer.state[p]["exp_avg_sq"], engine.optimizer.state[mine[n]]["exp_avg_sq"])
    assert fresh.optimizer_step_count() == 1
    # a LoRA checkpoint as init_from of a run without LoRA: base weights only, and a warning that says so
    with caplog.at_level("WARNING"):
        CheckpointManager(tmp / "run2", _one_rank_dims()).restore(trained["base"], resume="never", init_from=str(tmp / "lora"))
    assert "holds LoRA adapters that this run (model.lora.rank=0) does not load" in caplog.text
    assert fresh.train_step([batch], 1).loss == engine.train_step([batch], 1).loss


# -------------------------------------------------------------------------------- export vs HF logits
def test_merged_and_peft_exports_match_the_lora_model(trained):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from qvl_train.tools.convert import export_hf

    tmp, batch = trained["tmp"], trained["batch"]
    with pytest.raises(ValueError, match="not a LoRA run"):
        export_hf(tmp / "full", tmp / "nope", lora_adapter=True)
    export_hf(tmp / "full", tmp / "hf_base", dtype="fp32")
    export_hf(tmp / "lora", tmp / "hf_merged", dtype="fp32")
    export_hf(tmp / "lora", tmp / "adapter", lora_adapter=True)
    adapter_cfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8.0
    for name in ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.mlp.up_proj",
                 "model.visual.blocks.1.attn.qkv", "model.visual.merger.mlp.2"):
        assert name in adapter_cfg["target_modules"]

    def hf(d):
        return transformers.Qwen2VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()

    with_peft = peft.PeftModel.from_pretrained(hf(tmp / "hf_base"), tmp / "adapter").eval()
    kw = hf_kwargs(batch)
    want = trained["logits"]
    with torch.no_grad():
        got_merged = hf(tmp / "hf_merged")(**kw).logits[0]
        got_peft = with_peft(**kw).logits[0]
        got_base = hf(tmp / "hf_base")(**kw).logits[0]
    torch.testing.assert_close(got_merged, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_peft, want, rtol=1e-5, atol=1e-5)
    assert (got_base - want).abs().max() > 1e-3  # the adapters changed the logits: the check is sharp


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_vl_merged_and_peft_match(tmp_path, moe):
    """Qwen3-VL (DeepStack mergers, tied embeddings, no qkv bias), adapters in all towers, in memory; and
    Qwen3-VL-MoE, whose routed experts each get their own adapters: merged into HF's fused expert tensors,
    while a PEFT adapter (which cannot target fused tensors) is refused with the way out, and taken with
    attention-only targets."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from qvl_train.models import build_model, init_weights
    from qvl_train.models.hf_convert import ours_to_hf
    from qvl_train.models.lora import lora_layers, merged_state_dict
    from qvl_train.models.tiny import tiny_qwen3_vl_config, tiny_qwen3_vl_moe_config
    from qvl_train.tools.convert import _write_peft_adapter, hf_config_dict
    from tests.conftest import megatron_one_rank_world

    megatron_one_rank_world()
    make_cfg = tiny_qwen3_vl_moe_config if moe else tiny_qwen3_vl_config
    hf_cls, hf_config = ((transformers.Qwen3VLMoeForConditionalGeneration, transformers.Qwen3VLMoeConfig) if moe
                         else (transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig))

    def ours_model(lora):
        cfg = make_cfg(lora=lora)
        model = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True).eval()
        init_weights(model, seed=5, std=0.05)
        _fill_b(model, std=0.2)
        return cfg, model

    def hf_model(cfg, sd):
        model = hf_cls(hf_config(**hf_config_dict(cfg, "float32")))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = ["lm_head.weight"] if cfg.llm.tie_word_embeddings else []
        assert not unexpected and missing == tied, (missing, unexpected)
        model.tie_weights()
        return model.float().eval()

    def check_peft(cfg, ours, out):
        _write_peft_adapter(ours, cfg, out, None, None)
        base_sd = ours_to_hf({k: v for k, v in ours.state_dict().items() if "lora" not in k and "extra" not in k}, cfg, style="runtime")
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(hf_model(cfg, base_sd), out).eval()(**hf_kwargs(batch)).logits[0]
        torch.testing.assert_close(got, ours.logits(batch)[: batch.num_tokens], rtol=1e-5, atol=1e-5)
        return json.loads((out / "adapter_config.json").read_text())["target_modules"]

    cfg, ours = ours_model(replace(LORA, **ALL))
    batch = packed_batch(cfg)
    with torch.no_grad():
        want = ours.logits(batch)[: batch.num_tokens]
        got_merged = hf_model(cfg, ours_to_hf(merged_state_dict(ours), cfg, style="runtime"))(**hf_kwargs(batch)).logits[0]
    torch.testing.assert_close(got_merged, want, rtol=1e-5, atol=1e-5)
    if not moe:
        assert "model.visual.deepstack_merger_list.1.linear_fc2" in check_peft(cfg, ours, tmp_path)
        return
    assert any(".mlp.experts.local_experts.3.linear_fc2" in n for n in lora_layers(ours))
    with pytest.raises(ValueError, match="fused .* tensors, which a PEFT LoRA adapter cannot target"):
        _write_peft_adapter(ours, cfg, tmp_path / "refused", None, None)
    cfg, ours = ours_model(replace(LORA, targets=["linear_qkv", "linear_proj"]))
    assert "model.language_model.layers.1.self_attn.o_proj" in check_peft(cfg, ours, tmp_path / "attention")


# ------------------------------------------------------------------------------- tp = 2 against tp = 1
def _lora_grads(tp: int):
    """(loss, {(key, layer, offsets): gradient}) of the adapter factors after one backward at `tp`."""
    from megatron.core import parallel_state

    from qvl_train.models import build_model, init_weights
    from tests.unit.test_model_tp import _entries

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    cfg = _lora_cfg(modules=["llm", "projector", "vision"])
    model = build_model(cfg, ParallelConfig(tp=tp), pre_process=True, post_process=True)
    init_weights(model, seed=3, std=0.05)
    _fill_b(model)
    loss = model(packed_batch(cfg))
    loss.sum().backward()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(p.grad if "lora" in n else torch.zeros_like(p))  # gradients read out through the checkpoint layout
    grads = {k: v for k, v in _entries(model).items() if "lora" in k[0]}
    parallel_state.destroy_model_parallel()
    return loss.detach(), grads


def _tp_worker(rank: int, world_size: int) -> None:
    from tests.unit.test_model_tp import _check_shards

    loss1, full = _lora_grads(1)
    loss2, shards = _lora_grads(2)
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-5)
    assert len({k[0] for k in shards}) == 20  # {A, B} × (ViT and LLM: qkv, proj, fc1, fc2; projector: fc1, fc2)
    assert all(g.abs().max() > 0 for g in full.values()), "a zero gradient proves nothing"
    assert _check_shards(shards, full, rtol=1e-4, atol=1e-6) >= 8, "no adapter factor was sharded?"


def test_lora_tp2_matches_tp1():
    spawn_gloo(_tp_worker, 2)
