"""Samples over the token budget: text-only ones are truncated, ones with media are skipped."""

import pytest
from PIL import Image

from data_pipelines.packing import GlobalPlanner
from data_pipelines.schema import DataConfig, DataSource
from data_pipelines.shards import ShardWriter, read_index
from data_pipelines.stream import StepLoader
from data_pipelines.text import get_tokenizer

BUDGET = 128
LONG = [{"role": "user", "content": "Repeat: " + "tick tock " * 100}, {"role": "assistant", "content": "tick"}]
BIG = [{"role": "user", "content": [{"type": "image", "name": "img0.png"}, {"type": "text", "text": "What is it?"}]},
       {"role": "assistant", "content": "grey"}]


@pytest.fixture(scope="module")
def over_budget_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("over_budget")
    with ShardWriter(str(d), samples_per_shard=4) as w:
        w.add("long", LONG, {})
        w.add("big", BIG, {"img0.png": Image.new("RGB", (448, 448), (90, 90, 90))})  # 256 image tokens
        for i in range(6):
            w.add(f"short{i}", [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": str(i)}], {})
    return str(d)


def _cfg(path):
    return DataConfig(sources=[DataSource(path=path)], max_tokens=BUDGET, shuffle=False, pack_lookahead=4)


def test_planner_truncates_text_only_and_skips_media(over_budget_dir):
    index = read_index(over_budget_dir)
    planner = GlobalPlanner(_cfg(over_budget_dir), [index])
    refs = {s["id"]: (0, sh, i) for sh, shard in enumerate(index["shards"]) for i, s in enumerate(shard["samples"])}
    assert planner.entry(refs["long"])["n_text_tokens"] > BUDGET
    assert planner.cost(refs["long"]) == BUDGET  # planned at the truncated length, from the index alone
    assert planner.cost(refs["big"]) > BUDGET
    plans = [planner.next_micro_batch() for _ in range(4)]  # more than one epoch of 7 usable samples
    assert [refs["long"]] in plans  # it fills a micro-batch by itself
    assert all(refs["long"] not in p or p == [refs["long"]] for p in plans)
    assert refs["big"] not in [r for p in plans for r in p]
    assert set(planner.skipped) == {"too_long"} and planner.skipped["too_long"] == planner.epoch + 1


def test_loader_truncates_and_counts(over_budget_dir):
    cfg = _cfg(over_budget_dir)
    loader = StepLoader(cfg, micro_batches_per_step=4, dp_rank=0, dp_size=1)
    batches = loader.next_step()
    long = next(b for b in batches if b.sample_ids == ["long"])
    full, full_labels = get_tokenizer().encode_conversation(LONG, [], generation=cfg.generation)
    assert len(full) > BUDGET
    assert long.num_tokens == BUDGET and long.cu_seqlens.tolist() == [0, BUDGET]
    assert long.input_ids.tolist() == full[:BUDGET]  # the beginning is kept
    assert long.labels[: BUDGET - 1].tolist() == full_labels[1:BUDGET]  # shifted, cut alike
    assert long.position_ids[0].tolist() == list(range(BUDGET))
    stats = loader.stats()
    assert stats["data_truncated"] == sum(b.sample_ids == ["long"] for b in batches) >= 1
    too_long = loader.state_dict()["skipped"]["too_long"]  # the planner itself may be a step ahead (data.plan_ahead)
    assert stats["data_skipped/too_long"] == too_long >= 1
    assert stats["data_skipped"] == too_long  # a truncation is not a skip
    assert all(b.num_tokens <= BUDGET for b in batches)
