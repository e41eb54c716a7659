"""Held-out evaluation during training (2 CPU processes): `"kind": "eval"` lines per `data.valid`
source every `eval.every` steps, the same micro-batches each time, the same loss and greedy exact-match
accuracy in another layout (tp=2 × cp=2), and training itself unchanged by it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qvl_train.config import ConfigError, DataConfig, DataSource, EvalConfig, TrainConfig
from tests.conftest import ROOT, read_metrics, torchrun

STEPS = 4


@pytest.fixture(scope="module")
def valid_root(tmp_path_factory):
    """Two held-out sets from the synth factory with seeds the training set (seed 0) does not use."""
    root = tmp_path_factory.mktemp("valid")
    for seed in (1, 2):
        subprocess.run(
            [sys.executable, "-m", "data_pipelines.synth", "--out", str(root / f"heldout{seed}"),
             "--num-samples", "24", "--seed", str(seed), "--samples-per-shard", "12"],
            cwd=ROOT, check=True, capture_output=True,
        )
    return root


def _train(tmp_path, data_root, name, *extra, nproc=2):
    out = tmp_path / name
    torchrun(nproc, "+experiment=tiny", f"output_dir={out}", f"cluster.data_root={data_root}",
             "data.max_tokens=512", "train.global_batch_tokens=1024", "wandb.mode=disabled",
             f"train.max_steps={STEPS}", "checkpoint.every=0", *extra)
    rows = read_metrics(out)
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


def test_eval_lines_per_source_and_training_unchanged(tmp_path, data_root, valid_root):
    valid = f"data.valid=[{{path:{valid_root}/heldout1}},{{path:{valid_root}/heldout2}}]"
    with_eval = ["eval.every=2", "eval.max_batches=2", valid]
    train, evals = _train(tmp_path, data_root, "dp2", *with_eval)
    assert [(r["step"], r["source"]) for r in evals] == [
        (2, "heldout1"), (2, "heldout2"), (4, "heldout1"), (4, "heldout2")]
    for source in ("heldout1", "heldout2"):
        at2, at4 = [r for r in evals if r["source"] == source]
        assert at2["label_tokens"] == at4["label_tokens"] > 0  # the same held-out batches each time
        assert 0 < at4["loss"] < 20 and at4["loss"] != at2["loss"]  # the weights moved in between
        assert at2["answers"] == at4["answers"] > 0 and 0 <= at4["accuracy"] <= 1
    assert evals[0]["loss"] != evals[1]["loss"]  # each source on its own

    plain, none = _train(tmp_path, data_root, "plain")
    assert none == []
    assert [(r["loss"], r["grad_norm"], r["samples"]) for r in train] == \
        [(r["loss"], r["grad_norm"], r["samples"]) for r in plain]  # bit for bit: eval changes nothing

    # tp=2 × cp=2: predictions over the vocabulary shards and over the zigzag halves of every row
    _, tp_evals = _train(tmp_path, data_root, "tp2_cp2", "parallel.tp=2", "parallel.cp=2", *with_eval, nproc=4)
    for a, b in zip(evals, tp_evals):
        keys = ("step", "source", "label_tokens", "answers", "accuracy")
        assert [a[k] for k in keys] == [b[k] for k in keys]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # layout-independent held-out loss


def test_eval_config_errors_name_the_key():
    valid = DataConfig(valid=[DataSource(path="data/heldout")])
    with pytest.raises(ConfigError, match="data.valid is empty"):
        TrainConfig(eval=EvalConfig(every=10)).validate(1)
    with pytest.raises(ConfigError, match="eval.max_batches=3 is not divisible by the data-parallel size 2"):
        TrainConfig(data=valid, eval=EvalConfig(every=10, max_batches=3)).validate(2)
    with pytest.raises(ConfigError, match="eval.every must be >= 0"):
        EvalConfig(every=-1)
    TrainConfig(data=valid, eval=EvalConfig(every=10, max_batches=4)).validate(2)
    TrainConfig(eval=EvalConfig(every=0, max_batches=3)).validate(2)  # off: nothing to check
