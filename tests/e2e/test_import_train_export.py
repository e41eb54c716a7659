"""A released checkpoint's path: HF → import-hf → train at tp=2 from it → export-hf → loads in transformers."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from tests.conftest import read_metrics, torchrun  # noqa: E402
from tests.unit.test_convert import _cfg, _convert, _hf_model  # noqa: E402


def test_import_train_export(tmp_path, data_root):
    hf = _hf_model(_cfg("qwen2_5_vl"))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    _convert("import-hf", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "step_0000000" / "manifest.json").exists()

    out = tmp_path / "run"
    proc = torchrun(2, "+experiment=tiny_qwen2_5_vl", f"output_dir={out}", f"cluster.data_root={data_root}",
                    f"model.init_from={tmp_path / 'ckpt'}", "parallel.tp=2", "train.max_steps=2",
                    "data.max_tokens=512", "train.global_batch_tokens=1024", "wandb.mode=disabled")
    assert "weights initialised from" in proc.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)

    _convert("export-hf", "--ckpt", out, "--out", tmp_path / "export")
    cls = getattr(transformers, json.loads((tmp_path / "export" / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(tmp_path / "export")
    ref = dict(hf.named_parameters())
    moved = [n for n, p in model.named_parameters() if n in ref and not (p.detach() == ref[n].detach()).all()]
    assert moved, "training changed no exported weight"
