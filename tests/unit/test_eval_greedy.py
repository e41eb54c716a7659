"""GreedyMatch (held-out exact match of greedy generation) on the tiny model in one process: the hook's
argmax equals the full logits' argmax at the label positions, and a sample counts as answered exactly
when every one of its label tokens is that argmax."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from data_pipelines.schema import DataSource
from qvl_train.config import ParallelConfig
from qvl_train.evaluate import GreedyMatch, source_names
from qvl_train.models import build_model, init_weights
from qvl_train.models.tiny import packed_batch, tiny_model_config
from tests.conftest import megatron_one_rank_world


def test_greedy_match_counts_samples_whose_every_answer_token_is_the_argmax():
    megatron_one_rank_world()
    cfg = tiny_model_config()
    model = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    init_weights(model, seed=3, std=0.02)
    batch = packed_batch(cfg)
    assert batch.num_samples >= 2
    targets = torch.nonzero(batch.labels != -100).squeeze(1)
    with torch.no_grad():
        argmax = model.logits(batch).argmax(-1)[targets]
        # Labels do not change the logits: make sample 0 all-correct, sample 1 wrong at one token.
        sample = torch.bucketize(targets, batch.cu_seqlens[1:].long(), right=True)
        labels = batch.labels.clone()
        labels[targets] = argmax
        wrong_at = targets[sample == 1][-1]  # its last answer token (the end of turn)
        labels[wrong_at] = (labels[wrong_at] + 1) % cfg.llm.vocab_size
        batch.labels = labels
        probe = GreedyMatch(model, SimpleNamespace(tp=1, tp_rank=0))
        with probe:
            model(batch)
        model(batch)  # hook removed: nothing more recorded
    assert len(probe.preds) == 1 and torch.equal(probe.preds[0], argmax)
    answered = int(torch.unique(sample).numel())
    assert probe.count([batch]) == (answered - 1, answered)


def test_source_names_are_short_and_unique():
    paths = ["/data/synth_valid", "/other/synth_valid/", "pipe:aws s3 cp s3://b/heldout/{shard} -"]
    names = source_names([DataSource(path=p) for p in paths])
    assert names[:2] == ["synth_valid", "synth_valid_1"] and len(set(names)) == 3


def test_examples_show_the_image_prompt_answer_and_model_answer(data_root):
    """A loader micro-batch of the synthetic shards: the image comes back as the resized picture (un-patchified,
    un-normalised), the prompt ends where the answer starts, and the model answer reads the argmax."""
    import numpy as np

    from data_pipelines.schema import IGNORE_INDEX, DataConfig, DataSource
    from data_pipelines.stream import StepLoader
    from data_pipelines.vision import patchify, vision_spec
    from qvl_train.evaluate import examples

    cfg = DataConfig(sources=[DataSource(str(data_root / "synth"))], max_tokens=1024, plan_ahead=False)
    batch = StepLoader(cfg, micro_batches_per_step=1, dp_rank=0, dp_size=1).next_step()[0]
    targets = torch.nonzero(batch.labels != IGNORE_INDEX).squeeze(1)
    pred = batch.labels[targets].clone()
    pred[-1] = 0  # the last sample's last answer token is wrong
    rows = examples(batch, pred, cfg.generation, limit=batch.num_samples)
    assert [r["sample_id"] for r in rows] == batch.sample_ids
    with_image = [r for r in rows if r["image"] is not None]
    assert with_image and all(r["image"].dtype == np.uint8 and r["image"].shape[2] == 3 for r in with_image)
    assert all("<image>" in r["prompt"] for r in with_image)
    assert all(r["prompt"].rstrip().endswith("assistant") for r in rows)
    assert all(r["model_answer"] == r["answer"] for r in rows[:-1]) and rows[-1]["model_answer"] != rows[-1]["answer"]
    # the picture, normalised and patchified again, is the batch's pixel rows up to uint8 rounding
    spec = vision_spec(cfg.generation)
    first = with_image[0]["image"].astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    norm = (first - np.array(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)) / np.array(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    rows, grid = patchify(norm, spec.patch_size, spec.temporal_patch_size, spec.merge_size)
    assert list(grid) == batch.grid_thw.reshape(-1, 3)[0].tolist()
    assert np.abs(rows - batch.normalised().pixel_values[: rows.shape[0]].numpy()).max() < 1e-6  # the codes are the pixels
