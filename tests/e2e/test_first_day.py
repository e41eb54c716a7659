"""A new user's first mistakes end in a message of a few lines, within seconds, before any weight is read.

Resuming into an output_dir whose checkpoint belongs to another model, `model.init_from` a checkpoint of
another architecture, an `import-hf` directory whose model the run takes over, data paths that do not
exist (normal run and dry_run), and a `model=GEN/SIZE` with no such size.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, clean_env, torchrun

FAST = 30.0  # seconds: a mistake is reported before the model is built or any weight is read
TINY = ["data.max_tokens=512", "train.global_batch_tokens=1024", "wandb.mode=disabled"]


def _timed(nproc: int, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = torchrun(nproc, *overrides, check=False, timeout=120)
    return proc, time.monotonic() - t0


def _assert_short_message(proc: subprocess.CompletedProcess, seconds: float, *expected: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert seconds < FAST, f"took {seconds:.1f} s:\n{text[-3000:]}"
    for snippet in expected:
        assert snippet in text, f"{snippet!r} not in:\n{text[-4000:]}"
    assert "dist_checkpointing" not in text and "Global shape mismatch" not in text, text[-4000:]
    message = [l for l in proc.stderr.splitlines() if l.startswith("config error:")]
    assert len(message) == 1, proc.stderr[-4000:]  # one copy (local rank 0), not one per rank
    ours = []  # the message: from "config error:" to torchrun's own report of the failed worker
    for line in proc.stderr[proc.stderr.index("config error:"):].splitlines():
        if re.match(r"[WEI]\d{4} |Traceback", line):
            break
        ours.append(line)
    assert 1 <= len(ours) <= 12, "\n".join(ours)
    assert len(text) < 6000, text  # torchrun's own summary of the failed worker included
    return text


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A 1-step run of the tiny Qwen2-VL (2 LLM layers, width 64) with its checkpoint."""
    out = tmp_path_factory.mktemp("first_day") / "tiny"
    torchrun(1, "+experiment=tiny", f"output_dir={out}", f"cluster.data_root={data_root}", "train.max_steps=1", *TINY)
    step = out / "checkpoints" / "step_0000001"
    assert "model_arch.json" in json.loads((step / "manifest.json").read_text())["files"]
    return out


def test_resume_into_the_output_dir_of_another_model_is_refused_fast(trained, data_root):
    proc, seconds = _timed(2, "+experiment=tiny", f"output_dir={trained}", f"cluster.data_root={data_root}",
                           "train.max_steps=2", "model.llm.num_layers=4", "model.vision.hidden_size=128", *TINY)
    _assert_short_message(
        proc, seconds, "holds a checkpoint of another model", "model.llm.num_layers: checkpoint 2 vs run 4",
        "model.vision.hidden_size: checkpoint 64 vs run 128", "model=qwen2_vl/tiny", "checkpoint.resume=never",
        "output_dir=")
    print(f"resume mismatch: {seconds:.1f} s")


def test_a_checkpoint_without_model_arch_falls_back_to_config_yaml(trained, data_root, tmp_path):
    import shutil

    from qvl_train.checkpoint.manager import write_manifest

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    step = old / "checkpoints" / "step_0000001"
    (step / "model_arch.json").unlink()
    write_manifest(step)  # as written before model_arch.json existed
    proc, seconds = _timed(1, "+experiment=tiny_qwen2_5_vl", f"output_dir={old}", f"cluster.data_root={data_root}",
                           "train.max_steps=2", *TINY)
    _assert_short_message(proc, seconds, "model config from config.yaml", "model.generation: checkpoint 'qwen2_vl'")


def test_init_from_a_checkpoint_of_another_architecture_is_refused_fast(trained, data_root, tmp_path):
    proc, seconds = _timed(2, "+experiment=tiny_qwen2_5_vl", f"output_dir={tmp_path / 'run'}",
                           f"cluster.data_root={data_root}", f"model.init_from={trained}/checkpoints",
                           "model.llm.num_layers=2", *TINY)  # an architecture key: compared, not taken
    _assert_short_message(proc, seconds, "is a checkpoint of another model",
                          "model.generation: checkpoint 'qwen2_vl' vs run 'qwen2_5_vl'", "model=qwen2_vl/tiny",
                          "drop the model.* overrides")
    assert not (tmp_path / "run" / "checkpoints").exists()
    print(f"init_from mismatch: {seconds:.1f} s")


def test_init_from_an_import_takes_its_model_unless_overridden(data_root, tmp_path):
    pytest.importorskip("transformers")
    from tests.unit.test_convert import _cfg, _convert, _hf_model

    cfg = _cfg("qwen2_vl")  # the tiny Qwen2-VL with tied embeddings: the tiny experiment's has none
    cfg.llm.num_layers, cfg.vision.depth = 3, 3
    _hf_model(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
    _convert("import-hf", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt")

    out = tmp_path / "run"
    proc = torchrun(2, "+experiment=tiny", f"output_dir={out}", f"cluster.data_root={data_root}",
                    f"model.init_from={tmp_path / 'ckpt'}", "train.max_steps=1", *TINY)
    assert proc.stdout.count("taken from model.init_from") == 1, proc.stdout
    assert "LLM 3×64" in proc.stdout and "weights initialised from" in proc.stdout
    arch = json.loads((out / "checkpoints" / "step_0000001" / "model_arch.json").read_text())
    assert (arch["llm"]["num_layers"], arch["llm"]["tie_word_embeddings"]) == (3, True)
    # The same command again resumes its own checkpoint (the import's model is taken again).
    proc = torchrun(2, "+experiment=tiny", f"output_dir={out}", f"cluster.data_root={data_root}",
                    f"model.init_from={tmp_path / 'ckpt'}", "train.max_steps=2", *TINY)
    assert "resumed from" in proc.stdout

    proc, seconds = _timed(2, "+experiment=tiny", f"output_dir={tmp_path / 'other'}", f"cluster.data_root={data_root}",
                           f"model.init_from={tmp_path / 'ckpt'}", "model.llm.num_layers=2", *TINY)
    _assert_short_message(proc, seconds, "model.llm.num_layers: checkpoint 3 vs run 2",
                          "model.llm.tie_word_embeddings: checkpoint True vs run False", "model_config.json")


def _launch(*overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=clean_env())
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_data_path_is_named_before_the_model_is_built(tmp_path, dry_run):
    proc, seconds = _launch("+experiment=tiny", f"output_dir={tmp_path / 'run'}", f"cluster.data_root={tmp_path}",
                            f"dry_run={str(dry_run).lower()}")
    assert proc.returncode == 2 and seconds < FAST, proc.stderr[-3000:]
    assert f"data.sources[0].path={tmp_path}/synth" in proc.stderr and "no shard index" in proc.stderr
    assert "python -m data_pipelines.make_shards" in proc.stderr and "python -m data_pipelines.synth" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 1500


def test_missing_valid_path_is_named(tmp_path, data_root):
    proc, _ = _launch("+experiment=tiny", f"cluster.data_root={data_root}", "dry_run=true",
                      f"data.valid=[{{path: {tmp_path}/held_out}}]")
    assert proc.returncode == 2 and f"data.valid[0].path={tmp_path}/held_out" in proc.stderr, proc.stderr


def test_missing_index_in_an_existing_directory(tmp_path):
    (tmp_path / "synth").mkdir()
    proc, _ = _launch("+experiment=tiny", f"cluster.data_root={tmp_path}", "dry_run=true")
    assert proc.returncode == 2 and f"{tmp_path}/synth/index.json is missing" in proc.stderr, proc.stderr


@pytest.mark.parametrize("choice, expected", [
    ("qwen2_vl/8b", "qwen2_vl has no size '8b'; valid: qwen2_vl/2b, qwen2_vl/72b, qwen2_vl/7b, qwen2_vl/tiny"),
    ("qwen9/7b", "no model generation "
     "'qwen9'; valid: qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_5_moe, qwen3_6, qwen3_vl, qwen3_vl_moe, qwen_vl"),
])
def test_unknown_model_size_lists_the_valid_ones(choice, expected):
    proc, _ = _launch("+experiment=tiny", f"model={choice}", "dry_run=true")
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
