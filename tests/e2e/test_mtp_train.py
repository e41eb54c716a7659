"""End to end: `launch/train.py +experiment=tiny_qwen3_5 model.mtp_loss_weight=0.3` (the Qwen3.5 MTP head) runs 3
steps on 2 CPU processes at pp=2 with untied embeddings — the head on the last stage with its own synced copy of
the embedding — logs `loss/mtp` next to `loss` in metrics.jsonl and saves a checkpoint (the copy a secondary
replica of the embedding's key: dist_checkpointing refuses two primary writers of one key). `export-hf` of that
run (trained from scratch: config and tokenizer generated) writes the head's `mtp.*` tensors and a tokenizer with
Qwen3.5's vocabulary and special-token ids."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import ROOT, clean_env, read_metrics, torchrun


def test_mtp_head_trains_logs_and_exports(tmp_path, data_root):
    out = tmp_path / "mtp"
    torchrun(2, "+experiment=tiny_qwen3_5", f"output_dir={out}", f"cluster.data_root={data_root}", "train.max_steps=3",
             "checkpoint.every=3", "data.max_tokens=512", "train.global_batch_tokens=1024", "parallel.pp=2",
             "model.llm.tie_word_embeddings=false", "model.llm.mtp_num_layers=1", "model.mtp_loss_weight=0.3")
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss/mtp"]) and r["loss/mtp"] > 0 and r["loss"] > 0 for r in rows)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000003" and (ckpts / "step_0000003" / "complete").exists()

    from safetensors import safe_open

    hf = tmp_path / "hf"
    subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), "export-hf", "--ckpt", str(out), "--out", str(hf)],
                   check=True, env=clean_env(), cwd=ROOT, capture_output=True, timeout=300)
    keys = {k for f in hf.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}
    assert {"mtp.fc.weight", "mtp.norm.weight", "mtp.layers.0.self_attn.q_proj.weight"} <= keys
    assert json.loads((hf / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"] == 1
    added = {t["content"]: t["id"] for t in json.loads((hf / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<|im_start|>"] == 248045 and added["<|image_pad|>"] == 248056
