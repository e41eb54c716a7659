"""End to end (issue 14): a hostile index is refused before any process group or shell command, and a
run whose shards are all gone stops before its first optimizer step, naming skips and shards, with no
checkpoint and every skipped sample listed in data_skipped.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT, clean_env, free_port

INJECTION = "shard-000000.tar; id > pwned.txt; true"


def _train(cwd, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           str(ROOT / "launch" / "train.py"), "+experiment=tiny", "train.log_every=1", "wandb.mode=disabled",
           "data.num_workers=0", *overrides]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_hostile_index_refused_and_empty_data_stops_before_training(tmp_path, data_root):
    shards = tmp_path / "shards"
    shutil.copytree(data_root / "synth", shards)
    index = json.loads((shards / "index.json").read_text())
    index["shards"][1]["name"] = INJECTION
    (shards / "index.json").write_text(json.dumps(index))
    out = tmp_path / "refused"
    proc = _train(tmp_path, f"output_dir={out}", f"data.sources=[{{path:'pipe:cat {shards}/{{shard}}'}}]")
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]  # the ConfigError exit
    assert "config error" in proc.stderr and "index.json" in proc.stderr and repr(INJECTION) in proc.stderr, proc.stderr[-3000:]
    assert "not a plain shard file name" in proc.stderr
    assert not (tmp_path / "pwned.txt").exists() and not (ROOT / "pwned.txt").exists()
    assert not (out / "checkpoints").exists()

    # every shard file missing, read through a file:// URL (a remote-style source: not checked at config time)
    gone = tmp_path / "gone"
    shutil.copytree(data_root / "synth", gone)
    for name in os.listdir(gone):
        if name.endswith(".tar"):
            os.remove(gone / name)
    out = tmp_path / "empty"
    # max_bad_fraction=1: the bad-fraction stop (unit-tested) would otherwise fire first; here the empty step does
    proc = _train(ROOT, f"output_dir={out}", f"cluster.data_root=file://{tmp_path}", "data.sources.0.path=file://"
                  f"{gone}", "train.max_steps=3", "checkpoint.every=1", "data.max_bad_fraction=1.0")
    assert proc.returncode != 0, proc.stdout[-2000:]
    log = proc.stdout + proc.stderr
    assert "stopping before step 1: no rank got a usable sample" in log, log[-4000:]
    assert "shard_error" in log and "in shards ['shard-00000" in log and "no checkpoint" in log, log[-4000:]
    assert "could not read shard shard-0000" in log  # each unreadable shard named with its error
    ckpts = out / "checkpoints"
    assert not list(ckpts.glob("step_*")) and not (ckpts / "latest").exists(), list(ckpts.iterdir())
    lines = [json.loads(x) for x in (out / "data_skipped.jsonl").read_text().splitlines()]
    assert lines and all(x["reason"] == "shard_error" and x["id"].startswith("synth-") for x in lines)
    assert not (out / "metrics.jsonl").exists() or '"kind": "train"' not in (out / "metrics.jsonl").read_text()
