"""GreedyMatch (held-out exact match of greedy generation) on the tiny model in one process: the hook's
argmax equals the full logits' argmax at the label positions, and a sample counts as answered exactly
when every one of its label tokens is that argmax."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qvl_train.config import ParallelConfig
from qvl_train.evaluate import GreedyMatch, source_names
from qvl_train.models import build_model, init_weights
from qvl_train.models.tiny import packed_batch, tiny_model_config
from data_pipelines.schema import DataSource
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
