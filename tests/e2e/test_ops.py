"""Operations end to end on 2 CPU processes: monitoring keys, manifest + keep_last, a corrupted
checkpoint that resume skips for the previous one, and a diverging run that stops on its own."""

from __future__ import annotations

import json

from tests.conftest import read_metrics, torchrun

COMMON = ["+experiment=tiny", "data.max_tokens=512", "train.global_batch_tokens=1024", "wandb.mode=disabled"]
KEYS = (
    "lm_loss", "samples_per_s", "visual_token_share", "dp_imbalance", "mem/rss_gb", "time/data_s",
    "time/fwd_bwd_s", "time/optimizer_s", "time/checkpoint_s", "tflops_per_s", "skipped_steps",
)


def test_corrupt_checkpoint_falls_back_and_keep_last(tmp_path, data_root):
    out = tmp_path / "run"
    args = [*COMMON, f"cluster.data_root={data_root}", f"output_dir={out}", "checkpoint.every=1", "checkpoint.keep_last=2"]
    torchrun(2, *args, "train.max_steps=3")
    rows = read_metrics(out)
    for key in KEYS:
        assert key in rows[-1], key
    assert "mfu" not in rows[-1]  # CPU: no peak to divide by
    r = rows[-1]
    assert r["lm_loss"] == r["loss"] and 0 < r["visual_token_share"] < 1 and r["dp_imbalance"] >= 1.0
    assert r["tflops_per_s"] > 0 and r["time/checkpoint_s"] > 0 and r["skipped_steps"] == 0
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000003"]  # keep_last=2
    step3 = ckpts / "step_0000003"
    manifest = json.loads((step3 / "manifest.json").read_text())["files"]
    assert set(manifest) == {str(p.relative_to(step3)) for p in step3.rglob("*")
                             if p.is_file() and p.name not in ("manifest.json", "complete")}

    victim = max(manifest, key=lambda rel: manifest[rel]["size"])  # a tensor file
    data = bytearray((step3 / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (step3 / victim).write_bytes(bytes(data))

    proc = torchrun(2, *args, "train.max_steps=4")
    assert victim in proc.stdout and "falling back" in proc.stdout, proc.stdout[-3000:]
    assert "resumed from" in proc.stdout and "step_0000002" in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]  # step 3 trained again
    assert (ckpts / "latest").read_text().strip() == "step_0000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000003", "step_0000004"]
    from qvl_train.checkpoint.manager import verify_checkpoint

    verify_checkpoint(ckpts / "step_0000003")  # rewritten whole, not patched over the broken copy


def test_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, data_root):
    """A learning rate of 1e30 makes step 1's update blow the weights up; every later step is non-finite."""
    out = tmp_path / "nan"
    proc = torchrun(2, *COMMON, f"cluster.data_root={data_root}", f"output_dir={out}", "checkpoint.every=1",
                    "optim.lr=1e30", "train.max_bad_steps=2", "train.max_steps=10", check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "2 consecutive steps (up to step 3) had a non-finite loss" in text, text[-3000:]
    rows = read_metrics(out)
    assert [(r["step"], r["skipped_step"], r["skipped_steps"]) for r in rows] == [(1, 0, 0), (2, 1, 1), (3, 1, 2)]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000001"]
