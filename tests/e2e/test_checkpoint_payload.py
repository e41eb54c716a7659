"""End to end: a checkpoint whose pickles carry a payload (with a manifest that matches) is refused by
resume, `model.init_from` and export-hf, naming the file and the class, and the payload never runs.

One tiny 2-process run writes a real checkpoint; it passes the scan (timed). Copies of it get a payload
planted in `.metadata` (resume) and in `common.pt` (init_from, export-hf), and `manifest.json` rewritten
so that only the restricted unpickler stands in the way. Each payload would create a marker file.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time

import pytest
import torch

from qvl_train.checkpoint.manager import CheckpointIntegrityError, write_manifest
from qvl_train.checkpoint.safe_pickle import check_checkpoint
from tests.conftest import torchrun


class _System:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_payloads_refused_on_resume_init_from_and_export(tmp_path, data_root):
    common = ["+experiment=tiny", f"cluster.data_root={data_root}", "data.max_tokens=512",
              "train.global_batch_tokens=1024", "wandb.mode=disabled"]
    src = tmp_path / "src"
    torchrun(2, *common, f"output_dir={src}", "train.max_steps=1")
    step = src / "checkpoints" / "step_0000001"
    check_checkpoint(step)  # warm-up: the first call imports torch.distributed.checkpoint
    t0 = time.perf_counter()
    check_checkpoint(step)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"scan of the tiny demo checkpoint ({len(list(step.iterdir()))} files): {ms:.1f} ms")
    assert ms < 1000

    marker = tmp_path / "pwned"

    # resume: the run's own latest checkpoint with a payload in .metadata
    res = tmp_path / "resume"
    shutil.copytree(src, res)
    planted = res / "checkpoints" / "step_0000001"
    (planted / ".metadata").write_bytes(pickle.dumps(_System(f"touch {marker}")))
    write_manifest(planted)
    t0 = time.perf_counter()
    proc = torchrun(2, *common, f"output_dir={res}", "train.max_steps=2", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.perf_counter() - t0 < 120
    assert f"{planted}/.metadata refuses posix.system" in text, text[-3000:]
    assert not marker.exists() and not (res / "checkpoints" / "step_0000002").exists()

    # model.init_from (and export-hf): a checkpoint with a payload in common.pt
    shutil.copytree(src, tmp_path / "init")  # the whole output_dir: export-hf reads its config.yaml
    ini = tmp_path / "init" / "checkpoints"
    planted = ini / "step_0000001"
    torch.save({"train_state": _Exec(f"open({str(marker)!r}, 'w').close()")}, planted / "common.pt")
    write_manifest(planted)
    proc = torchrun(2, *common, f"output_dir={tmp_path / 'new'}", f"model.init_from={ini}", "train.max_steps=1",
                    check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{planted}/common.pt refuses builtins.exec" in text, text[-3000:]
    assert not marker.exists()

    from qvl_train.tools.convert import export_hf

    with pytest.raises(CheckpointIntegrityError, match=r"common\.pt refuses builtins\.exec"):
        export_hf(ini, tmp_path / "hf")
    assert not marker.exists() and not (tmp_path / "hf").exists()
