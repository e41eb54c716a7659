"""The restricted unpickler that vets a checkpoint's pickles (`.metadata`, `*.pt`, DCP BYTE_IO objects).

Each payload below would run a command if any code-running unpickler touched it; every test checks that
the scan names the file and the class and that the marker file the payload writes never appears. The
step directories are written with torch DCP (no process group) in the layout megatron-core gives ours:
tensors, a BytesIO object holding `torch.save` of an RNG state, `common.pt`, then `manifest.json`.
A real tiny-run checkpoint is scanned in tests/e2e/test_checkpoint_payload.py.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import time

import numpy as np
import pytest
import torch

from qvl_train.checkpoint.manager import COMPLETE, CheckpointIntegrityError, verify_checkpoint, write_manifest
from qvl_train.checkpoint.safe_pickle import (
    ALLOWED,
    UnsafePickleError,
    check_checkpoint,
    scan_checkpoint,
    vet_pickle,
    vet_torch_save,
)


class _System:
    """Unpickling this runs `os.system(cmd)` (a REDUCE on posix.system)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Exec:
    """Unpickling this runs `exec(code)` (a REDUCE on builtins.exec)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _rng_blob() -> bytes:
    buf = io.BytesIO()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    torch.save([state], buf)  # what megatron's torch_dist strategy writes for a ShardedObject
    return buf.getvalue()


def _step(tmp_path, *, rng: bytes | None = None, common=None, name="step_0000001"):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class RawBytes(DefaultSavePlanner):  # as megatron's MCoreSavePlanner: BytesIO objects written as they are
        def transform_object(self, write_item, object):
            return object

    d = tmp_path / name
    state = {"model.weight": torch.randn(4, 3), "rng_state/shard_0": io.BytesIO(rng if rng is not None else _rng_blob())}
    dcp.save(state, checkpoint_id=str(d), no_dist=True, planner=RawBytes())
    meta = pickle.loads((d / ".metadata").read_bytes())  # written just now by this test: trusted
    meta.storage_meta.checkpoint_id = str(d)  # plain DCP keeps a PosixPath here, megatron's writer a str
    (d / ".metadata").write_bytes(pickle.dumps(meta))
    torch.save(common if common is not None else {"train_state": {"step": 1, "data": {"cursor": [1, 2]}},
                                                  "optimizer_format": "per_param"}, d / "common.pt")
    write_manifest(d)
    (d / COMPLETE).write_text("1\n")
    return d


def _plant(d, rel: str, data: bytes) -> None:
    (d / rel).write_bytes(data)
    write_manifest(d)  # a valid manifest: the hash check passes, only the scan stands in the way


def test_our_layout_passes_and_references_only_allowed_globals(tmp_path):
    d = _step(tmp_path)
    verify_checkpoint(d)
    t0 = time.perf_counter()
    assert scan_checkpoint(d) is None
    ms = (time.perf_counter() - t0) * 1e3
    print(f"scan of a 3-pickle step directory: {ms:.2f} ms")
    seen = vet_torch_save(_rng_blob())
    assert ("numpy", "ndarray") in seen and ("torch._utils", "_rebuild_tensor_v2") in seen
    assert all(k in ALLOWED or k[0] == "torch" for k in seen)
    meta, seen = vet_pickle((d / ".metadata").read_bytes())
    assert type(meta).__name__ == "Metadata" and ("torch.distributed.checkpoint.metadata", "Metadata") in seen


def test_payload_in_metadata_is_refused_and_never_runs(tmp_path):
    d = _step(tmp_path)
    marker = tmp_path / "pwned"
    _plant(d, ".metadata", pickle.dumps(_System(f"touch {marker}")))
    with pytest.raises(CheckpointIntegrityError, match=r"\.metadata refuses posix\.system.*nothing in it was executed"):
        verify_checkpoint(d)
    assert not marker.exists()


def test_payload_in_common_pt_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    d = _step(tmp_path, common={"train_state": _Exec(f"open({str(marker)!r}, 'w').close()")})
    with pytest.raises(CheckpointIntegrityError, match=r"common\.pt refuses builtins\.exec"):
        verify_checkpoint(d)
    assert not marker.exists()


def test_payload_in_a_byte_io_object_is_refused_naming_file_and_object(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save([_System(f"touch {marker}")], buf)  # torch.save writes the REDUCE, runs nothing
    d = _step(tmp_path, rng=buf.getvalue())
    with pytest.raises(CheckpointIntegrityError, match=r"\.distcp \(object 'rng_state/shard_0'.*refuses posix\.system"):
        check_checkpoint(d)
    assert not marker.exists()


def test_the_ranks_shares_cover_every_unit(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save([_System(f"touch {marker}")], buf)
    d = _step(tmp_path, rng=buf.getvalue())
    verdicts = [scan_checkpoint(d, rank=r, world_size=2) for r in range(2)]
    assert sum(v is not None for v in verdicts) == 1 and not marker.exists()


@pytest.mark.parametrize("payload, refused", [
    (b"c__builtin__\neval\n(S'1'\ntR.", "builtins.eval"),  # protocol-0 Python 2 names are normalised first
    (b"\x80\x02ctorch\nByteStorage\nJ\x00\x00\x00\x10\x85R.", "torch.ByteStorage is called"),
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.", "_codecs.encode with encoding 'rot13'"),
    (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nK\x01\x85R.", "is called on a int, not a storage"),
    (b"\x80\x02ctorch\nload\n.", "torch.load"),
    (b"\x80\x02X\x05\x00\x00\x00posixX\x06\x00\x00\x00system\x93.", "posix.system"),  # STACK_GLOBAL
])
def test_refusals(payload, refused):
    with pytest.raises(UnsafePickleError, match=refused.replace(".", r"\.").replace("(", r"\(")):
        vet_pickle(payload, storages=True)


def test_metadata_entry_outside_the_step_directory_is_refused(tmp_path):
    d = _step(tmp_path)
    meta, _ = vet_pickle((d / ".metadata").read_bytes())
    for index, info in meta.storage_data.items():
        if index.fqn.startswith("rng_state"):
            info.relative_path = "../elsewhere.distcp"
    _plant(d, ".metadata", pickle.dumps(meta))
    with pytest.raises(CheckpointIntegrityError, match=r"names file '\.\./elsewhere\.distcp'"):
        verify_checkpoint(d)


def test_legacy_or_garbage_pt_is_refused(tmp_path):
    d = _step(tmp_path)
    buf = io.BytesIO()
    torch.save({"a": 1}, buf, _use_new_zipfile_serialization=False)
    _plant(d, "common.pt", buf.getvalue())
    with pytest.raises(CheckpointIntegrityError, match=r"common\.pt is not a torch\.save zip archive"):
        verify_checkpoint(d)
    _plant(d, "common.pt", b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointIntegrityError, match=r"common\.pt is not a pickle this framework reads"):
        verify_checkpoint(d)


def test_payload_in_a_per_rank_metadata_file_is_refused(tmp_path):
    d = _step(tmp_path)
    marker = tmp_path / "pwned"
    _plant(d, "__0.metadata", pickle.dumps(_System(f"touch {marker}")))  # DCP reads these with read_metadata(rank=0)
    with pytest.raises(CheckpointIntegrityError, match=r"__0\.metadata refuses posix\.system"):
        verify_checkpoint(d)
    assert not marker.exists()
