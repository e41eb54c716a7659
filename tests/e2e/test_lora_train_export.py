"""LoRA from the command line: import-hf → `launch/train.py model.lora.rank=8` at tp=2 from the import →
export merged and as a PEFT adapter → the HF base + adapter (loaded by peft) gives the merged model's logits."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.conftest import read_metrics, torchrun  # noqa: E402
from tests.unit.test_convert import _cfg, _hf_model  # noqa: E402
from tests.unit.test_lora import hf_kwargs  # noqa: E402


def test_lora_train_then_export_merged_and_adapter(tmp_path, data_root):
    from qvl_train.models.tiny import packed_batch, tiny_model_config
    from qvl_train.tools.convert import export_hf, import_hf

    _hf_model(_cfg("qwen2_vl")).save_pretrained(tmp_path / "hf", safe_serialization=True)  # tied, as the 2B
    import_hf(tmp_path / "hf", tmp_path / "ckpt")  # in this process (the CLI is tested in tests/unit/test_convert.py)
    out = tmp_path / "run"
    proc = torchrun(2, "+experiment=tiny_qwen2_vl", f"output_dir={out}", f"cluster.data_root={data_root}",
                    f"model.init_from={tmp_path / 'ckpt'}", "model.llm.tie_word_embeddings=true", "parallel.tp=2",
                    "model.lora.rank=8", "train.max_steps=2", "data.max_tokens=512", "train.global_batch_tokens=1024",
                    "optim.lr=1e-2", "optim.warmup_steps=0", "wandb.mode=disabled")
    assert "weights initialised from" in proc.stdout
    # 2 LLM layers × (qkv 1,536 + proj 1,024 + fc1 2,560 + fc2 1,536) + projector (4,096 + 2,560) at rank 8
    assert re.search(r"parameters\s+19,968 trainable of [\d,]+ \(0\.\d+%\); LoRA rank 8", proc.stdout), proc.stdout[-2000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]

    export_hf(out, tmp_path / "merged", dtype="fp32")
    export_hf(out, tmp_path / "adapter", lora_adapter=True)
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((tmp_path / "hf").resolve())

    kw = hf_kwargs(packed_batch(tiny_model_config()))
    load = transformers.Qwen2VLForConditionalGeneration.from_pretrained
    with torch.no_grad():
        base = load(tmp_path / "hf", dtype=torch.float32).eval()
        got_base = base(**kw).logits[0]
        got_peft = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(**kw).logits[0]
        got_merged = load(tmp_path / "merged", dtype=torch.float32).eval()(**kw).logits[0]
    torch.testing.assert_close(got_peft, got_merged, rtol=1e-5, atol=1e-5)
    assert (got_base - got_merged).abs().max() > 1e-3  # training moved the adapters
