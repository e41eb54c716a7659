"""Checkpoint manifests and keep_last pruning, on plain directories (no process group; common.pt a small torch.save).

The end-to-end path (a real save, a corrupted byte, resume falling back) is tests/e2e/test_ops.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from qvl_train.checkpoint.manager import (
    COMPLETE,
    LATEST,
    MANIFEST,
    CheckpointIntegrityError,
    CheckpointManager,
    complete_step_dirs,
    verify_checkpoint,
    write_manifest,
)


def _fake_step(root, step, *, complete=True):
    d = root / f"step_{step:07d}"
    (d / "sub").mkdir(parents=True)
    torch.save({"step": step, "blob": bytes(range(256)) * 10}, d / "common.pt")  # the scan reads torch.save zips
    (d / "__0_0.distcp").write_bytes(b"tensor bytes %d" % step)
    (d / "sub" / "metadata.json").write_text("{}")
    write_manifest(d)
    if complete:
        (d / COMPLETE).write_text(f"{step}\n")
    return d


def test_manifest_lists_every_file_and_verifies(tmp_path):
    d = _fake_step(tmp_path, 3)
    files = json.loads((d / MANIFEST).read_text())["files"]
    assert sorted(files) == ["__0_0.distcp", "common.pt", "sub/metadata.json"]
    assert files["common.pt"]["size"] == (d / "common.pt").stat().st_size and len(files["common.pt"]["sha256"]) == 64
    verify_checkpoint(d)  # no error
    for rank in range(3):  # the ranks' shares together cover the manifest
        verify_checkpoint(d, rank=rank, world_size=1)


def test_one_flipped_byte_is_refused_naming_the_file(tmp_path):
    d = _fake_step(tmp_path, 3)
    data = bytearray((d / "common.pt").read_bytes())
    data[100] ^= 1
    (d / "common.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=r"common\.pt has SHA-256"):
        verify_checkpoint(d)


def test_missing_file_and_missing_manifest(tmp_path):
    d = _fake_step(tmp_path, 3)
    (d / "sub" / "metadata.json").unlink()
    with pytest.raises(CheckpointIntegrityError, match=r"sub/metadata\.json is listed in manifest\.json but missing"):
        verify_checkpoint(d)
    e = _fake_step(tmp_path, 4)
    (e / MANIFEST).unlink()
    with pytest.raises(CheckpointIntegrityError, match=r"manifest\.json is missing.*--write-manifest"):
        verify_checkpoint(e)
    (e / "__0_0.distcp").write_bytes(b"longer than before, truncated or appended")
    write_manifest(e)  # the documented way to adopt a trusted checkpoint
    verify_checkpoint(e)


def test_keep_last_keeps_exactly_n_and_never_latest_or_init_from(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        _fake_step(root, step)
    crashed = _fake_step(root, 6, complete=False)
    mgr = CheckpointManager(root, dims=None, keep_last=2, init_from=str(root / "step_0000002"))
    (root / LATEST).write_text("step_0000005\n")
    mgr.prune(root / "step_0000005")
    left = sorted(p.name for p in root.iterdir() if p.is_dir())
    # newest 2 complete (4, 5) + step 2 (init_from points into it); 1, 3 and the crashed 6 are gone
    assert left == ["step_0000002", "step_0000004", "step_0000005"]
    assert not crashed.exists()

    mgr = CheckpointManager(root, dims=None, keep_last=1)
    mgr.prune(root / "step_0000004")  # latest moved back (a fallback): 5 is a stale future, 4 stays
    assert [p.name for p in complete_step_dirs(root)] == ["step_0000004"]
