"""Compute-aware step planning: budget, balance, dp independence, exact resume, and the FLOP model
the packer balances by (the model config's `batch_flops`, the count MFU uses)."""

import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_pipelines.packing import GlobalPlanner, balance_step, image_grid
from data_pipelines.schema import DataConfig, DataSource
from data_pipelines.stream import StepLoader
from data_pipelines.synth import generate
from qvl_train.config import LLMConfig, ModelConfig, VisionConfig
from qvl_train.models.tiny import tiny_qwen2_5_vl_config, tiny_qwen3_vl_moe_config
from qvl_train.monitor.flops import SampleFlops, batch_flops

MODELS = Path(__file__).resolve().parents[2] / "configs" / "model"


def model_yaml(name: str) -> ModelConfig:
    """A released model's config from configs/model/<generation>/<size>.yaml."""
    d = yaml.safe_load((MODELS / f"{name}.yaml").read_text())
    return ModelConfig(vision=VisionConfig(**d.pop("vision", {})), llm=LLMConfig(**d.pop("llm", {})), **d)


QWEN25_7B = SampleFlops(model_yaml("qwen2_5_vl/7b"))


def _mix_index(n=6000, seed=0):
    """A realistic index mix: 20% text-only, long documents, single and multi-image, 200^2..4000^2, 1:4..4:1."""
    rng = random.Random(seed)

    def img():
        area = math.exp(rng.uniform(math.log(200 * 200), math.log(4000 * 4000)))
        ar = math.exp(rng.uniform(math.log(0.25), math.log(4)))
        return [max(1, round(math.sqrt(area / ar))), max(1, round(math.sqrt(area * ar)))]

    samples = []
    for i in range(n):
        u = rng.random()
        if u < 0.2:
            t, ims = int(math.exp(rng.uniform(math.log(30), math.log(2000)))), []
        elif u < 0.25:
            t, ims = rng.randint(2000, 7000), [img() for _ in range(rng.randint(0, 2))]
        elif u < 0.8:
            t, ims = rng.randint(20, 600), [img()]
        else:
            t, ims = rng.randint(50, 1000), [img() for _ in range(rng.randint(2, 4))]
        samples.append({"id": f"m{i}", "key": f"{i:06d}", "n_text_tokens": t, "images": ims})
    return {"version": 1, "shards": [{"name": f"s{k}.tar", "samples": samples[a:a + 500]}
                                     for k, a in enumerate(range(0, n, 500))]}


def _mix_cfg(balance, **kw):
    return DataConfig(max_tokens=8192, generation="qwen2_5_vl", balance=balance, **kw)


def _planner(balance, index, flop_model=QWEN25_7B):
    return GlobalPlanner(_mix_cfg(balance), [index], flop_model)


def _dp_imbalance(planner, plans, dp):
    mb = np.array([sum(planner.flops(r) for r in p) for p in plans])
    ranks = np.array([mb[r::dp].sum() for r in range(dp)])
    return ranks.max() / ranks.mean()


@pytest.fixture(scope="module")
def mix():
    return _mix_index()


def test_budget_is_hard_and_sets_do_not_depend_on_balance(mix):
    planners = {b: _planner(b, mix) for b in ("compute", "tokens", "none")}
    for _ in range(6):
        steps = {b: p.next_step(16) for b, p in planners.items()}
        for b, plans in steps.items():
            assert len(plans) == 16 and all(plans)
            for plan in plans:
                assert sum(planners[b].cost(r) for r in plan) <= 8192
        sets = {b: sorted(r for p in plans for r in p) for b, plans in steps.items()}
        assert sets["compute"] == sets["tokens"] == sets["none"]
    states = [json.dumps(p.state_dict(), sort_keys=True) for p in planners.values()]
    assert len(set(states)) == 1  # balancing never changes the stream or the packer buffer


def test_compute_balancing_beats_tokens_only(mix):
    results = {}
    for b in ("compute", "tokens"):
        planner = _planner(b, mix)
        imb = [_dp_imbalance(planner, planner.next_step(16), dp=4) for _ in range(8)]
        results[b] = float(np.mean(imb))
    assert results["compute"] < 1.02, results
    assert results["compute"] < results["tokens"] - 0.01, results


def test_balance_step_keeps_samples_and_budget():
    rng = random.Random(3)
    for trial in range(20):
        refs = list(range(rng.randint(5, 80)))
        tokens = {r: rng.randint(1, 300) for r in refs}
        weight = {r: tokens[r] * rng.uniform(0.5, 3.0) for r in refs}
        plans, cur, used = [], [], 0
        for r in refs:  # a sequential fill within a budget of 1000
            if used + tokens[r] > 1000:
                plans.append(cur)
                cur, used = [], 0
            cur.append(r)
            used += tokens[r]
        plans.append(cur)
        out = balance_step(plans, weight, tokens, 1000)
        assert sorted(r for p in out for r in p) == refs
        assert all(p and sum(tokens[r] for r in p) <= 1000 for p in out)
        before = max(sum(weight[r] for r in p) for p in plans)
        assert max(sum(weight[r] for r in p) for p in out) <= before + 1e-6
        assert balance_step(plans, weight, tokens, 1000) == out  # deterministic


def _flop_index():
    """Index entries of every kind the planner costs: text, a truncated text-only one, images, a video."""
    samples = [
        {"id": "t", "key": "0", "n_text_tokens": 300, "images": []},
        {"id": "long", "key": "1", "n_text_tokens": 5000, "images": []},  # over the 4096 limit: truncated
        {"id": "i1", "key": "2", "n_text_tokens": 40, "images": [[500, 300]]},
        {"id": "i3", "key": "3", "n_text_tokens": 120, "images": [[1000, 1000], [90, 700], [224, 224]]},
        {"id": "v", "key": "4", "n_text_tokens": 60, "images": [[300, 300]], "videos": [[40, 10.0, 240, 320]]},
    ]
    return {"version": 1, "shards": [{"name": "s0.tar", "samples": samples}]}


@pytest.mark.parametrize("model, generation, patch", [
    (tiny_qwen2_5_vl_config(), "qwen2_5_vl", 14),  # ViT windows + full-attention blocks
    (tiny_qwen3_vl_moe_config(), "qwen3_vl_moe", 16),  # DeepStack mergers, MoE router + top-k experts
])
def test_packer_cost_is_batch_flops_of_the_sample(model, generation, patch):
    """The weight the packer balances is `batch_flops` of the sample alone, on the trained model's config:
    the same count MFU reports, so imbalance is measured in the work the GPUs actually do."""
    cfg = DataConfig(sources=[DataSource("x")], generation=generation, patch_size=patch, max_tokens=4096)
    planner = GlobalPlanner(cfg, [_flop_index()], SampleFlops(model))
    refs = [(0, 0, i) for i in range(5)]
    for ref in refs:
        e = planner.entry(ref)
        grids = [p.grid_thw for p in planner.video_plans(ref)] if e.get("videos") else []
        grids += [image_grid(h, w, patch_size=patch, merge_size=2, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
                  for h, w in e["images"]]
        tokens = planner.cost(ref)
        want = batch_flops(model, grids, [tokens], min(e["n_text_tokens"], tokens))
        assert planner.flops(ref) == float(want.forward) and want.training == 3 * want.forward
    assert planner.cost(refs[1]) == 4096  # truncated text: planned (and costed) at the limit
    assert planner.flop_inputs(refs[4])[0][0][0] > 1  # the video's temporal patches
    # MoE: the active parameters only (router + top-k experts), not all experts
    if model.llm.num_experts:
        more = SampleFlops(tiny_qwen3_vl_moe_config())
        more.model.llm.num_experts *= 4
        moe_text = planner.flop_inputs(refs[0])
        router = 2 * moe_text[1] * model.llm.hidden_size * 3 * model.llm.num_experts * model.llm.num_layers
        assert more(*moe_text) - planner.flops(refs[0]) == router  # 3E more router columns, same experts


def test_packer_cost_of_a_fixed_size_input():
    """Qwen-VL resizes every image to 448²: the packer costs each as that 32×32-patch grid (ViT + resampler),
    whatever its stored size, as the loader builds it."""
    model = model_yaml("qwen_vl/tiny")
    cfg = DataConfig(sources=[DataSource("x")], generation="qwen_vl", merge_size=1, max_tokens=4096)
    planner = GlobalPlanner(cfg, [_flop_index()], SampleFlops(model))
    grids, tokens, labels = planner.flop_inputs((0, 0, 3))
    assert grids == [(1, 32, 32)] * 3 and tokens == 120 + 3 * 256 and labels == 120
    assert planner.flops((0, 0, 3)) == batch_flops(model, grids, [tokens], labels).forward


def test_flop_model_on_the_released_config():
    """Qwen2.5-VL-7B: a visual token costs ~1.3× a text token; attention is quadratic in the sample's own
    length; the packer's weight pickles (it may be planned in another process)."""
    f = QWEN25_7B
    grid = image_grid(1000, 1000, patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    tokens = grid[1] * grid[2] // 4
    ratio = f([grid], tokens, 0) / f([], tokens, 0)  # the same tokens as text, without labels
    assert 1.1 < ratio < 1.6, ratio
    assert f([], 8000, 0) > 2 * f([], 4000, 0)
    assert pickle.loads(pickle.dumps(f))([grid], tokens, 10) == f([grid], tokens, 10)
    with pytest.raises(ValueError, match="balance"):
        DataConfig(balance="flops")


def test_without_a_flop_model_compute_balances_tokens(mix):
    """The data side holds no architecture numbers: built without a FLOP model (tools, tests), balance
    `compute` evens out tokens (`weighting`), exactly like `tokens`, and `flops()` says what is missing."""
    bare, tokens = _planner("compute", mix, None), _planner("tokens", mix)
    assert bare.weighting == "tokens" and _planner("compute", mix).weighting == "compute"
    for _ in range(3):
        assert bare.next_step(8) == tokens.next_step(8)
    with pytest.raises(ValueError, match="flop_model"):
        bare.flops(bare.buffer[0])
    assert bare.weight(bare.buffer[0]) == bare.cost(bare.buffer[0])


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth_pack")
    generate(str(d), 120, seed=11, samples_per_shard=40, min_side=56, max_side=224)
    return str(d)


def _global_ids(loaders, steps):
    out, dp = [], len(loaders)
    for _ in range(steps):
        per_rank = [ld.next_step() for ld in loaders]
        out.append([per_rank[j % dp][j // dp].sample_ids for j in range(dp * len(per_rank[0]))])
    return out


def _cfg(path, **kw):
    return DataConfig(sources=[DataSource(path=path)], max_tokens=512, balance="compute", **kw)


TINY = SampleFlops(tiny_qwen2_5_vl_config())


def test_loader_dp_independence_resume_and_stats(synth_dir):
    cfg = _cfg(synth_dir)
    ref = _global_ids([StepLoader(cfg, micro_batches_per_step=4, dp_rank=0, dp_size=1, flop_model=TINY)], 2)
    loaders = [StepLoader(cfg, micro_batches_per_step=4, dp_rank=r, dp_size=4, flop_model=TINY) for r in range(4)]
    assert _global_ids(loaders, 2) == ref
    st = loaders[0].last_step_stats()
    assert set(st) >= {"packing_efficiency", "dp_imbalance", "mb_imbalance", "est_flops"}
    assert 0.5 < st["packing_efficiency"] <= 1.0 and st["dp_imbalance"] >= 1.0 and st["mb_imbalance"] >= 1.0
    assert all(ld.last_step_stats()["packing_efficiency"] == st["packing_efficiency"] for ld in loaders)

    # exact resume with balance=compute across dp 2 -> 4 (and into another balance mode: same sets)
    orig = [StepLoader(cfg, micro_batches_per_step=4, dp_rank=r, dp_size=2, flop_model=TINY) for r in range(2)]
    _global_ids(orig, 2)
    state = json.loads(json.dumps(orig[0].state_dict()))
    expected = _global_ids(orig, 2)
    resumed = [StepLoader(cfg, micro_batches_per_step=4, dp_rank=r, dp_size=4, flop_model=TINY) for r in range(4)]
    for ld in resumed:
        ld.load_state_dict(state)
    assert _global_ids(resumed, 2) == expected
    other = StepLoader(_cfg(synth_dir).__class__(**{**cfg.__dict__, "balance": "none"}),
                       micro_batches_per_step=4, dp_rank=0, dp_size=1)
    other.load_state_dict(state)
    got = _global_ids([other], 2)
    assert [sorted(i for mb in s for i in mb) for s in got] == [sorted(i for mb in s for i in mb) for s in expected]


def test_many_small_samples_plan_quickly():
    """Micro-batches of hundreds of short chat samples: the pair phase is bounded (PAIR_POOL), so a
    step plans in about a second (it used to build ~10^9-entry exchange matrices) and still balances."""
    import random
    import time

    rng = random.Random(0)
    shards = [{"name": f"s{j}.tar", "samples": [{"id": f"{j}-{i}", "key": str(i), "n_text_tokens": rng.randint(30, 90),
                                                "images": []} for i in range(1000)]} for j in range(3)]
    planner = GlobalPlanner(DataConfig(sources=[DataSource("x")], max_tokens=16384), [{"version": 1, "shards": shards}],
                            QWEN25_7B)
    t = time.perf_counter()
    plans = planner.next_step(4)
    assert time.perf_counter() - t < 20
    assert min(len(p) for p in plans) > 150
    loads = [sum(planner.flops(r) for r in p) for p in plans]
    assert max(loads) / (sum(loads) / 4) < 1.001
