"""End to end: `launch/train.py engine=deepspeed engine.zero_stage=3 engine.offload_optimizer=cpu` on 2 CPU
processes trains a step, evaluates (forward-only under ZeRO-3) and writes
a checkpoint in the megatron engine's format (the weights load into the megatron-core model as they are,
AdamW moments per parameter name), which is what export-hf, model.init_from and a resume read."""

from __future__ import annotations

import torch

from tests.conftest import megatron_one_rank_world, read_metrics, torchrun
from tests.unit.test_config import _compose


def test_deepspeed_zero3_trains_and_saves_megatron_format(tmp_path, data_root):
    from megatron.core import dist_checkpointing

    from qvl_train.models import build_model

    out = tmp_path / "ds"
    overrides = ["+experiment=tiny", "engine=deepspeed", "engine.zero_stage=3", "data.max_tokens=512",
                 "train.global_batch_tokens=1024", "train.max_steps=1"]
    proc = torchrun(2, *overrides, "engine.offload_optimizer=cpu", f"output_dir={out}", f"cluster.data_root={data_root}",
                    "wandb.mode=disabled", "eval.every=1", "eval.max_batches=2", "data.valid=[{path:${cluster.data_root}/synth}]")
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] > 0 and rows[0]["grad_norm"] > 0
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["loss"] > 0 and evals[0]["label_tokens"] > 0
    assert "fresh start" in proc.stdout
    step_dir = out / "checkpoints" / "step_0000001"
    assert (step_dir / "complete").exists()

    megatron_one_rank_world()
    cfg = _compose(*overrides)
    model = build_model(cfg.model, cfg.parallel, pre_process=True, post_process=True)
    saved = set(dist_checkpointing.load_tensors_metadata(str(step_dir)))
    request = model.sharded_state_dict()
    keys = {sh.key for sh in request.values() if hasattr(sh, "key") and "_extra_state" not in sh.key}  # tensors
    assert keys <= saved
    assert {f"optimizer.{k}.exp_avg" for k in keys} <= saved
    loaded = dist_checkpointing.load(request, str(step_dir))
    missing, _ = model.load_state_dict(loaded, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")]
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in model.parameters() if p.ndim > 1)
