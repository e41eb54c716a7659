"""End to end: a tiny 2-rank run logs `data/bytes_read` and `data/bytes_used` (summed over dp ranks) every
step, in metrics.jsonl and wandb; over shards with member offsets it reads within 5% of the bytes its
samples hold, over the same shards with an index of the old form (no offsets) it streams and reads more,
and both runs train on the same global sample order (identical data traces)."""

from __future__ import annotations

import json
import shutil

from qvl_train.monitor.summary import summarize
from tests.conftest import read_metrics, torchrun


def _old_index_copy(src, dst) -> None:
    shutil.copytree(src, dst)
    idx = json.loads((dst / "index.json").read_text())
    for sh in idx["shards"]:
        sh.pop("size", None)
        for s in sh["samples"]:
            s.pop("offset", None)
            s.pop("members", None)
    (dst / "index.json").write_text(json.dumps(idx))


def test_bytes_read_and_used_with_and_without_offsets(tmp_path, data_root):
    old_root = tmp_path / "old_data"
    _old_index_copy(data_root / "synth", old_root / "synth")
    common = ["+experiment=tiny", "data.max_tokens=512", "train.global_batch_tokens=2048", "train.max_steps=3",
              "train.log_every=1", "checkpoint.every=1000", "data.trace=true", "data.num_workers=0"]
    torchrun(2, *common, f"cluster.data_root={data_root}", f"output_dir={tmp_path / 'ranged'}", "wandb.mode=offline")
    torchrun(2, *common, f"cluster.data_root={old_root}", f"output_dir={tmp_path / 'streamed'}", "wandb.mode=disabled")

    amp = {}
    for name in ("ranged", "streamed"):
        train = [r for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3]
        assert all(r["data/bytes_used"] > 0 for r in train), train
        amp[name] = sum(r["data/bytes_read"] for r in train) / sum(r["data/bytes_used"] for r in train)
    assert 1.0 <= amp["ranged"] <= 1.05 < amp["streamed"], amp
    for rank in (0, 1):  # the same samples in the same micro-batches, whatever the read path
        trace = [(tmp_path / run / "data_trace" / f"dp{rank}.jsonl").read_text() for run in ("ranged", "streamed")]
        assert trace[0] == trace[1] and trace[0].count("\n") == 3 * 2
    line = [x for x in summarize(tmp_path / "ranged").splitlines() if x.startswith("data I/O")]
    assert line and f"{amp['ranged']:.2f}x amplification" in line[0], line
    wandb_files = list((tmp_path / "ranged" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_files and b"data/bytes_read" in wandb_files[0].read_bytes()
