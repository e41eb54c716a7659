"""Checkpoint pickles, vetted by a restricted unpickler before anything deserialises them.

Why: a step directory holds three kinds of pickle, and two of them are read by code we do not
control with the full (code-running) unpickler:

    .metadata        torch DCP's `Metadata`, read with plain `pickle.load` (FileSystemReader.read_metadata)
    *.distcp BYTE_IO megatron's `ShardedObject`s (our per-rank RNG state), each a `torch.save` blob inside a
                     .distcp file, read with `torch.load(weights_only=False)` (DefaultLoadPlanner.load_bytes)
    common.pt        the non-sharded state (TrainState dict, optimizer format and step count), read by
                     megatron's TorchCommonLoadStrategy with `torch.load(path, map_location='cpu')`: no
                     explicit `weights_only`, so torch >= 2.6 defaults to True, unless the environment sets
                     TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 — which is why it is vetted here as well.

The tensors of a .distcp file are read by DCP with `torch.load(weights_only=True)` (torch's own
restricted unpickler) and are not scanned again. `manifest.json`'s SHA-256s prove that the files are
the ones the manifest lists, not who wrote them: anyone who can write a checkpoint can also write its
manifest. So `scan_checkpoint` (run by `manager.verify_checkpoint`, after the hash check and before
any load: resume, `model.init_from`, export-hf) unpickles each of those pickles with `_Unpickler`,
which admits only the globals listed in `ALLOWED` (found by scanning the checkpoints of tiny runs:
megatron and DeepSpeed engines, optim.distributed, pp=2, tp=2 bf16, MoE, LoRA, async save) and
refuses anything else with the file and the `module.name`, before it is called. Storages are never
read (a persistent id becomes a placeholder), and tensor-rebuild functions are replaced by stubs that
accept only such a placeholder, so a scan reads a few kB per pickle: milliseconds per checkpoint.

What the allowlisted callables can do when the real loader runs them: build DCP's metadata
dataclasses and enums, a numpy array or dtype from bytes, an OrderedDict, a tensor from a storage,
bytes from a latin-1 string (`_codecs.encode`, checked here to be latin-1), a torch layout by name.
None returns a `str`, so a STACK_GLOBAL cannot compute a name at load time that the scan did not see.

    python -m qvl_train.checkpoint.safe_pickle STEP_DIR   # scan one step directory, print the time
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from qvl_train.checkpoint.manager import CheckpointIntegrityError

DCP_METADATA = ".metadata"
_DCP_META = "torch.distributed.checkpoint.metadata"
_DCP_PLAN = "torch.distributed.checkpoint.planner"

# (module, name) -> where a checkpoint of ours holds it. Anything else is refused.
ALLOWED: dict[tuple[str, str], str] = {
    **{(_DCP_META, n): ".metadata: DCP Metadata and its entries" for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): ".metadata: file, offset, length of each entry",
    **{(_DCP_PLAN, n): ".metadata: the save plans DCP keeps in Metadata" for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")},
    ("torch", "Size"): ".metadata: tensor and chunk sizes",
    ("torch.serialization", "_get_layout"): ".metadata: TensorProperties.layout (torch.strided by name)",
    ("collections", "OrderedDict"): "BYTE_IO rng_state: a tensor's (empty) backward hooks",
    ("_codecs", "encode"): "BYTE_IO rng_state: bytes at pickle protocol 2 (latin-1 only, checked)",
    ("numpy", "ndarray"): "BYTE_IO rng_state: numpy's MT19937 key (np.random.get_state)",
    ("numpy", "dtype"): "BYTE_IO rng_state: its dtype",
    ("numpy._core.multiarray", "_reconstruct"): "BYTE_IO rng_state: numpy >= 2 array pickles",
    ("numpy.core.multiarray", "_reconstruct"): "BYTE_IO rng_state: numpy 1.x array pickles (older checkpoints)",
    ("torch._utils", "_rebuild_tensor_v2"): "BYTE_IO rng_state: torch.get_rng_state() (stubbed while scanning)",
}
# Also admitted by rule: every torch dtype (`torch.float32`, .metadata TensorProperties) and storage
# type (`torch.ByteStorage`, BYTE_IO persistent ids; a placeholder that cannot be called).


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that references a global outside `ALLOWED` (or uses one in a way ours never do)."""


class _Storage:
    """Stands for a storage: never read while scanning."""


class _StorageType:
    """Stands for `torch.<X>Storage`: admitted only inside a persistent id, never called."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(f"{self.qualname} is called (ours appear only in storage persistent ids)")


def _rebuild_stub(qualname: str) -> Callable:
    def rebuild(storage, *args, **kwargs):
        if not isinstance(storage, _Storage):
            raise UnsafePickleError(f"{qualname} is called on a {type(storage).__name__}, not a storage")
        return storage
    return rebuild


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} (pickle writes bytes as latin1)")
    return obj.encode("latin1")


_STUBS: dict[tuple[str, str], Callable[[str], Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_stub,
    ("_codecs", "encode"): lambda _: _latin1_encode,
}


def _normalise(module: str, name: str) -> tuple[str, str]:
    """Python 2 names that pickle protocol <= 2 writes (`__builtin__`, `copy_reg`) to Python 3's."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _resolve(module: str, name: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class _Unpickler(pickle.Unpickler):
    """`find_class` admits `ALLOWED` only; `persistent_load` (torch.save's storages) returns a placeholder
    when `storages` is set and refuses otherwise (plain pickles such as `.metadata` have none)."""

    def __init__(self, file, *, storages: bool) -> None:
        super().__init__(file)
        self.storages = storages
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str) -> Any:
        module, name = _normalise(module, name)
        key = (module, name)
        if module == "torch" and "." not in name:
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype):
                self.seen.add(key)
                return value
            if name.endswith("Storage") and isinstance(value, type):
                self.seen.add(key)
                return _StorageType(f"torch.{name}")
        if key not in ALLOWED:
            raise UnsafePickleError(f"refuses {module}.{name}: not a class a checkpoint of ours contains")
        self.seen.add(key)
        if key in _STUBS:
            return _STUBS[key](f"{module}.{name}")
        return _resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        ok = (self.storages and isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
              and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int))
        if not ok:
            raise UnsafePickleError(f"refuses persistent id {str(pid)[:80]!r}: not a torch.save storage record")
        return _Storage()


def vet_pickle(data: bytes, *, storages: bool = False) -> tuple[Any, set[tuple[str, str]]]:
    """Unpickle `data` with the restricted unpickler; returns (object, globals it referenced).
    Raises `UnsafePickleError` for a refused global, `pickle.UnpicklingError` etc. for a broken one."""
    unpickler = _Unpickler(io.BytesIO(data), storages=storages)
    return unpickler.load(), unpickler.seen


def vet_torch_save(data: bytes) -> set[tuple[str, str]]:
    """Vet a `torch.save` blob: every `*.pkl` record of its zip archive, read with torch's own archive
    reader (the one `torch.load` uses, so both see the same records); storages are not read."""
    if not data.startswith(b"PK\x03\x04"):
        raise UnsafePickleError("is not a torch.save zip archive (the legacy format is not read)")
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    seen: set[tuple[str, str]] = set()
    records = [r for r in reader.get_all_records() if r.endswith(".pkl")]
    if not records:
        raise UnsafePickleError("is a zip archive without a data.pkl record")
    for record in records:
        seen |= vet_pickle(reader.get_record(record), storages=True)[1]
    return seen


def _byte_io_entries(metadata: Any, step_dir: Path) -> list[tuple[str, str, int, int]]:
    """(fqn, file, offset, length) of every non-tensor entry of a vetted DCP `Metadata`: the entries DCP
    reads as BYTE_IO with the full unpickler. File names are checked to stay inside `step_dir`."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UnsafePickleError(f"holds a {type(metadata).__name__}, not a DCP Metadata with storage_data")
    entries = []
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata):
            continue  # read with torch.load(weights_only=True)
        rel = info.relative_path
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
            raise UnsafePickleError(f"entry {index.fqn!r} names file {rel!r}, not a file of the step directory")
        if getattr(info, "transform_descriptors", None):
            raise UnsafePickleError(f"entry {index.fqn!r} has stream transforms {info.transform_descriptors!r} "
                                    "(checkpoints of ours have none)")
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0 and info.length >= 0):
            raise UnsafePickleError(f"entry {index.fqn!r} has offset {info.offset!r}, length {info.length!r}")
        entries.append((index.fqn, rel, info.offset, info.length))
    return sorted(entries, key=lambda e: (e[1], e[2]))


def scan_checkpoint(step_dir: str | Path, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """Vet every pickle the load path reads in `step_dir`; rank r takes every world_size-th unit
    (`*.pt` files and BYTE_IO objects; every rank vets `.metadata`, which locates the BYTE_IO objects).

    Returns None, or the first problem as a message naming the file and the refused `module.name`
    (`verify_checkpoint` gathers these over the ranks and raises `CheckpointIntegrityError`).
    Reads no storage and runs nothing outside `ALLOWED`. Never raises (the verdict is gathered over ranks)."""
    try:
        return _scan(Path(step_dir), rank, world_size)
    except Exception as err:  # noqa: BLE001 - e.g. an unreadable directory: a named refusal, not a hang
        return _problem(str(step_dir), err)


def _scan(step_dir: Path, rank: int, world_size: int) -> Optional[str]:
    units: list[tuple[str, Callable[[], Any]]] = []

    def read_slice(rel: str, offset: int, length: int) -> bytes:
        with open(step_dir / rel, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise UnsafePickleError(f"ends before byte {offset + length}")
        return data

    for pt in sorted(p for p in step_dir.rglob("*.pt") if p.is_file()):
        units.append((str(pt), lambda pt=pt: vet_torch_save(pt.read_bytes())))
    for other in sorted(p for p in step_dir.glob(f"*{DCP_METADATA}") if p.is_file() and p.name != DCP_METADATA):
        units.append((str(other), lambda other=other: vet_pickle(other.read_bytes())))  # DCP's per-rank `__N.metadata`
    meta_path = step_dir / DCP_METADATA
    if meta_path.is_file():
        try:
            metadata, _ = vet_pickle(meta_path.read_bytes())
            entries = _byte_io_entries(metadata, step_dir)
        except Exception as err:  # noqa: BLE001 - any failure is a named refusal, nothing ran
            return _problem(str(meta_path), err)
        for fqn, rel, offset, length in entries:
            units.append((f"{step_dir / rel} (object {fqn!r}, bytes {offset}..{offset + length})",
                          lambda rel=rel, offset=offset, length=length: vet_torch_save(read_slice(rel, offset, length))))
    for where, vet in units[rank::world_size]:
        try:
            vet()
        except Exception as err:  # noqa: BLE001
            return _problem(where, err)
    return None


def _problem(where: str, err: Exception) -> str:
    if isinstance(err, UnsafePickleError):
        return f"{where} {err} (nothing in it was executed)"
    return f"{where} is not a pickle this framework reads: {type(err).__name__}: {err}"


def check_checkpoint(step_dir: str | Path) -> None:
    """`scan_checkpoint` on one process: raise `CheckpointIntegrityError` naming the file and class."""
    problem = scan_checkpoint(step_dir)
    if problem:
        raise CheckpointIntegrityError(f"checkpoint {step_dir} failed verification: {problem}")


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Vet the pickles of a checkpoint step directory.")
    parser.add_argument("step_dir")
    args = parser.parse_args()
    import torch.distributed.checkpoint.metadata  # noqa: F401 - imported by any load anyway: not timed

    t0 = time.perf_counter()
    check_checkpoint(args.step_dir)
    print(f"{args.step_dir}: every pickle admitted ({(time.perf_counter() - t0) * 1e3:.1f} ms)")
