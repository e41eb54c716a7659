"""End to end: `launch/train.py +experiment=tiny_qwen_vl` on 2 CPU processes trains Qwen-VL on the synthetic
shards (fixed 448² images, 256 resampler tokens each, grounding with <ref>/<box>) and the loss falls."""

from __future__ import annotations

from tests.conftest import read_metrics, torchrun


def test_tiny_qwen_vl_learns(tmp_path, data_root):
    out = tmp_path / "tiny_qwen_vl"
    torchrun(2, "+experiment=tiny_qwen_vl", f"output_dir={out}", f"cluster.data_root={data_root}",
             "train.max_steps=10", "checkpoint.every=100", "optim.warmup_steps=2")
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 11))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.4, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert (out / "checkpoints" / "step_0000010" / "complete").exists()
