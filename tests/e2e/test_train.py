"""End to end: `launch/train.py +experiment=tiny` on 2 CPU processes learns, checkpoints and resumes."""

from __future__ import annotations

import json

from tests.conftest import read_metrics, torchrun


def test_tiny_learns_then_resumes_at_the_right_step(tmp_path, data_root):
    out = tmp_path / "tiny"
    common = [f"output_dir={out}", f"cluster.data_root={data_root}", "checkpoint.every=100"]
    proc = torchrun(2, "+experiment=tiny", *common)
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 201))
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.6 * first, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    for key in ("grad_norm", "lr", "tokens", "samples", "packing_efficiency", "tokens_per_s", "step_time_s"):
        assert key in rows[-1], key
    assert 0.5 < rows[-1]["packing_efficiency"] <= 1.0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000200"
    assert (ckpts / "step_0000100" / "complete").exists() and (ckpts / "step_0000200" / "complete").exists()
    assert (out / "config.yaml").exists() and (out / "git_commit.txt").exists()
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run"
    assert "metrics" in proc.stdout and "checkpoint" in proc.stdout

    # A second run with a longer horizon continues from step 200, not from scratch.
    proc = torchrun(2, "+experiment=tiny", *common, "train.max_steps=205")
    assert "resumed from" in proc.stdout
    rows2 = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows2] == list(range(1, 206))
    assert rows2[200]["loss"] < first
    assert (ckpts / "latest").read_text().strip() == "step_0000205"
    state = json.loads(json.dumps(rows2[-1]))
    assert state["step"] == 205


def test_resume_reproduces_the_uninterrupted_run(tmp_path, data_root):
    common = ["+experiment=tiny", f"cluster.data_root={data_root}", "data.max_tokens=512",
              "train.global_batch_tokens=1024", "wandb.mode=disabled", "checkpoint.every=3"]
    straight = tmp_path / "straight"
    torchrun(2, *common, f"output_dir={straight}", "train.max_steps=6")
    cut = tmp_path / "cut"
    torchrun(2, *common, f"output_dir={cut}", "train.max_steps=3")
    torchrun(2, *common, f"output_dir={cut}", "train.max_steps=6")
    a = [(r["step"], r["loss"], r["grad_norm"], r["samples"]) for r in read_metrics(straight)]
    b = [(r["step"], r["loss"], r["grad_norm"], r["samples"]) for r in read_metrics(cut)]
    assert a == b  # bit for bit on CPU


def test_stage_chaining_takes_weights_not_optimizer(tmp_path, data_root):
    common = ["+experiment=tiny", f"cluster.data_root={data_root}", "data.max_tokens=512",
              "train.global_batch_tokens=1024", "wandb.mode=disabled", "train.max_steps=3"]
    s1 = tmp_path / "s1"
    torchrun(2, *common, "stage=stage1_align", f"output_dir={s1}")
    s2 = tmp_path / "s2"
    proc = torchrun(2, *common, "stage=stage2_multitask", f"output_dir={s2}", f"model.init_from={s1}/checkpoints")
    assert "weights initialised from" in proc.stdout and "step_0000003" in proc.stdout
    fresh, chained = read_metrics(s1), read_metrics(s2)
    assert [r["step"] for r in chained] == [1, 2, 3]  # a new run: new step count and schedule
    assert chained[0]["lr"] == fresh[0]["lr"]
    assert chained[0]["samples"] == fresh[0]["samples"]  # same data, different weights
    assert chained[0]["loss"] != fresh[0]["loss"]
    # A run with its own checkpoint resumes it; init_from is ignored then.
    proc = torchrun(2, *common, "stage=stage2_multitask", f"output_dir={s2}", "train.max_steps=4",
                    f"model.init_from={s1}/checkpoints")
    assert "resumed from" in proc.stdout and [r["step"] for r in read_metrics(s2)] == [1, 2, 3, 4]


def test_signal_saves_a_checkpoint_and_stops_then_resume_continues(tmp_path, data_root):
    """SIGUSR1 (SLURM's warning before a time limit) to the workers: checkpoint at the step boundary, clean exit."""
    import signal
    import time

    import psutil

    from tests.conftest import torchrun_popen

    out = tmp_path / "sig"
    args = ["+experiment=tiny", f"cluster.data_root={data_root}", "data.max_tokens=512",
            "train.global_batch_tokens=1024", "wandb.mode=disabled", "checkpoint.every=1000",
            "train.max_steps=400", f"output_dir={out}"]
    proc = torchrun_popen(2, *args)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGUSR1)  # one rank only: the stop is agreed over all ranks
    stdout, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout[-3000:]
    rows = read_metrics(out)
    last = rows[-1]["step"]
    assert 3 <= last < 400 and "stopped after step" in stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{last:07d}"
    torchrun(2, *args[:-2], f"train.max_steps={last + 2}", f"output_dir={out}")
    assert [r["step"] for r in read_metrics(out)] == list(range(1, last + 3))
