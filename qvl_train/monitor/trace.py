"""`data.trace=true`: `output_dir/data_trace/dp{R}.jsonl`, the sample ids of every micro-batch.

Written by the first tensor/pipeline rank of each data-parallel rank. On resume the file is cut back
to the resumed step before appending, so the trace of a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path


class DataTrace:
    def __init__(self, output_dir: str | Path, dp_rank: int, resume_step: int) -> None:
        self.path = Path(output_dir) / "data_trace" / f"dp{dp_rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError):
                    continue
        self.path.write_text("".join(kept))
        self._f = open(self.path, "a", buffering=1)

    def write(self, step: int, micro_sample_ids: list[list[str]]) -> None:
        for micro, ids in enumerate(micro_sample_ids):
            self._f.write(json.dumps({"step": step, "micro": micro, "sample_ids": list(ids)}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
