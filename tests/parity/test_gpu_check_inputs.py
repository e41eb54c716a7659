"""benchmarks/gpu_check.py's throughput inputs: the image mix fills a pack deterministically with images
of several sizes, multi-image and text-only samples; the HF side's padded batch holds exactly those
samples; the HF model built from the check's (quick) config has our model's parameter count.
The timed steps themselves run in `python benchmarks/gpu_check.py --device cpu --quick` (~45 s, not here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data_pipelines.text import IMAGE_PAD_ID as IMAGE_PAD  # noqa: E402
from qvl_train.config import ParallelConfig  # noqa: E402
from qvl_train.models import build_model  # noqa: E402
from qvl_train.tools.convert import hf_config_dict  # noqa: E402
from qvl_train.tools.hf_parity import synthetic_packed_batch, synthetic_samples  # noqa: E402
from tests.conftest import megatron_one_rank_world  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parents[2] / "benchmarks/gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _samples(seed: int = 0):
    cfg = gpu_check._mfu_config(quick=True)
    return cfg, synthetic_samples(cfg, 1024, gpu_check.image_mix(quick=True), torch.Generator().manual_seed(seed))


def test_image_mix_pack_is_mixed_and_deterministic():
    cfg, samples = _samples()
    _, again = _samples()
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, again))
    n_images = [len(s["grids"]) for s in samples]
    assert 0 in n_images and max(n_images) >= 2  # text-only and multi-image samples
    assert len({tuple(g) for s in samples for g in s["grids"]}) >= 4  # several sizes / aspect ratios
    batch = synthetic_packed_batch(cfg, 1024, None, None, samples=samples)
    assert batch.num_tokens == sum(s["input_ids"].numel() for s in samples) <= 1024
    assert batch.grid_thw.shape[0] == sum(n_images)


def test_hf_padded_inputs_hold_the_same_samples():
    _, samples = _samples()
    kw = gpu_check.hf_padded_inputs(samples)
    lengths = [s["input_ids"].numel() for s in samples]
    assert kw["input_ids"].shape == (len(samples), max(lengths))
    assert kw["attention_mask"].sum(1).tolist() == lengths
    for i, s in enumerate(samples):
        assert torch.equal(kw["input_ids"][i, : lengths[i]], s["input_ids"])
        assert (kw["labels"][i, lengths[i]:] == -100).all()
    assert int((kw["input_ids"] == IMAGE_PAD).sum()) * 4 == int(kw["image_grid_thw"].prod(-1).sum())
    assert kw["pixel_values"].shape[0] == int(kw["image_grid_thw"].prod(-1).sum())


def test_hf_model_of_the_check_config_matches_ours():
    megatron_one_rank_world()
    cfg = gpu_check._mfu_config(quick=True)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**hf_config_dict(cfg, "float32")))
    ours = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())


def test_fp8_part_runs_and_measures_on_cpu():
    """Part 5 in its CPU form (the FP8 emulation): the FP8 rows ran FP8 GEMMs (the bf16/fp32 rows none), the
    loss gap is measured per step and inside its goal, and the speed verdict says it is no speed figure."""
    rows = gpu_check.check_fp8("cpu", quick=True)
    assert len(rows) == 6
    base, fp8 = rows[0::2], rows[1::2]
    assert all(r["fp8_gemm_layers"] == 0 for r in base)
    assert all(r["fp8_gemm_layers"] >= 16 and r["precision"].startswith("fp8 torch") for r in fp8)
    assert all(r["tokens_per_s"] > 0 for r in rows[:4])
    assert "not a speed figure" in fp8[0]["verdict"] and "not a speed figure" in fp8[1]["verdict"]
    loss = fp8[2]
    assert 0 < loss["rel_gap"] <= gpu_check.FP8_LOSS_GAP_GOAL and loss["verdict"] == "PASS"
    assert loss["loss_last"] < loss["loss_first"]  # it trained
    assert 0 < fp8[1]["rel_gap"] < 0.1  # the MoE layer's FP8 output: within FP8 rounding of the fp32 one, not equal
