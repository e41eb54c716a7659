"""A loader micro-batch with videos (make_shards → StepLoader) trains the tiny Qwen2.5-VL / Qwen3-VL models."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("av")

from data_pipelines.make_shards import make_shards  # noqa: E402
from data_pipelines.schema import DataConfig, DataSource  # noqa: E402
from data_pipelines.stream import StepLoader  # noqa: E402
from qvl_train.config import ParallelConfig  # noqa: E402
from qvl_train.models import build_model, init_weights  # noqa: E402
from qvl_train.models.tiny import tiny_qwen2_5_vl_config, tiny_qwen3_vl_config  # noqa: E402
from tests.conftest import megatron_one_rank_world  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "video")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vidmodel")
    media = d / "media"
    media.mkdir()
    shutil.copy(os.path.join(FIX, "odd_70x38_10fps.mp4"), media / "clip.mp4")
    recs = [{"id": "v", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A white square."}]}]
    (d / "in.json").write_text(json.dumps(recs))
    report = make_shards("qwen-finetune", str(d / "in.json"), str(media), str(d / "out"), progress=False)
    assert report["written"] == 1
    return str(d / "out")


@pytest.mark.parametrize("make_cfg", [tiny_qwen2_5_vl_config, tiny_qwen3_vl_config], ids=["qwen2_5_vl", "qwen3_vl"])
def test_video_batch_forward_backward(shard_dir, make_cfg):
    megatron_one_rank_world()
    mcfg = make_cfg()
    p = mcfg.vision.patch_size
    cfg = DataConfig(sources=[DataSource(path=shard_dir)], max_tokens=256, generation=mcfg.generation,
                     patch_size=p, video_min_pixels=(2 * p) ** 2 * 4, video_max_pixels=(2 * p) ** 2 * 24)
    (batch,) = StepLoader(cfg, micro_batches_per_step=1, dp_rank=0, dp_size=1).next_step()
    assert batch.media_kind is not None and bool((batch.media_kind == 1).all()) and batch.grid_thw[0, 0] > 1
    model = build_model(mcfg, ParallelConfig(), pre_process=True, post_process=True)
    init_weights(model, seed=1, std=0.02)
    loss = model(batch)
    assert torch.isfinite(loss).all() and loss.shape == (batch.num_slots,)
    (loss.sum() / batch.num_label_tokens).backward()
    grads = [q.grad for n, q in model.named_parameters() if n.startswith("vision.")]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)  # the video reached the ViT
