"""`data.trace=true`: `output_dir/data_trace/dp{R}.jsonl`, the sample ids of every micro-batch.

Written by the first tensor/pipeline rank of each data-parallel rank. On resume the file is cut back
to the resumed step before appending, so the trace of a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

from qvl_train.monitor.metrics import truncate_jsonl


class DataTrace:
    def __init__(self, output_dir: str | Path, dp_rank: int, resume_step: int) -> None:
        self.path = Path(output_dir) / "data_trace" / f"dp{dp_rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        self._f = open(self.path, "a", buffering=1)

    def write(self, step: int, micro_sample_ids: list[list[str]]) -> None:
        for micro, ids in enumerate(micro_sample_ids):
            self._f.write(json.dumps({"step": step, "micro": micro, "sample_ids": list(ids)}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
