"""Run code in the transformers 5.x reference environment (`.venv-ref`) and get tensors back.

Our main stack pins transformers 4.57 (the reference of the older generations); Qwen3.5/3.6 need
transformers >= 5.2, which lives in a second pinned environment that `make setup` builds
(`.venv-ref`, see `constraints-ref.txt`). Parity tests and tools call into it through one function:

    from qvl_train.tools.reference import run_reference
    out = run_reference("hf_gated_delta_rule", {"q": q, "k": k, ...}, {"chunked": True})

`run_reference(function, tensors, args, file=...)` writes `tensors` to a temp dir as safetensors and
`args` as JSON, starts `<ref python> qvl_train/tools/reference_side.py --file FILE --function NAME
--dir TMP`, and reads `outputs.safetensors` back. Nothing is pickled in either direction. The
function lives in a Python file inside this repository (default `qvl_train/tools/reference_side.py`)
that imports only torch, safetensors and transformers: it runs under `.venv-ref`'s interpreter,
which has no megatron-core. Its signature is `fn(tensors: dict[str, Tensor], **args) -> dict[str,
Tensor]`. Each call starts one interpreter (importing a transformers model costs ~4 s here), so do
all the reference work of a test in one call.

The interpreter is `$QVL_REF_PYTHON` if set, else `<repo>/.venv-ref/bin/python`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().with_name("reference_side.py")
ENV_VAR = "QVL_REF_PYTHON"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ReferenceUnavailable(RuntimeError):
    """The reference environment is missing (not an error of the code under test)."""


def reference_python() -> Path:
    """The reference interpreter: `$QVL_REF_PYTHON` or `<repo>/.venv-ref/bin/python`; raises if absent."""
    override = os.environ.get(ENV_VAR)
    path = Path(override) if override else REPO_ROOT / ".venv-ref" / "bin" / "python"
    if not (path.is_file() and os.access(path, os.X_OK)):
        where = f"${ENV_VAR}={override}" if override else str(path)
        raise ReferenceUnavailable(
            f"the transformers 5.x reference interpreter {where} does not exist: run `make setup` "
            f"(builds .venv-ref, the transformers 5.x reference) or point ${ENV_VAR} at a python with "
            f"transformers>=5.2, torch and safetensors")
    return path


def reference_available() -> tuple[bool, str]:
    """(True, "") when the reference interpreter exists, else (False, why) — for test skips."""
    try:
        reference_python()
    except ReferenceUnavailable as e:
        return False, str(e)
    return True, ""


def _resolve_file(file: str | Path) -> Path:
    """A `.py` file inside the repository (relative paths are taken from the repo root)."""
    path = Path(file)
    path = (path if path.is_absolute() else REPO_ROOT / path).resolve()
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"reference function file {file} is not an existing .py file")
    if not path.is_relative_to(REPO_ROOT):
        raise ValueError(f"reference function file {path} is outside the repository {REPO_ROOT}: "
                         f"put the reference-side code in the repo (e.g. qvl_train/tools/reference_side.py)")
    return path


def run_reference(function: str, tensors: dict[str, torch.Tensor] | None = None, args: dict | None = None, *,
                  file: str | Path = RUNNER, timeout: float = 600.0) -> dict[str, torch.Tensor]:
    """Call `function(tensors, **args)` from `file` in the reference environment; return its tensors.

    `tensors` cross as safetensors (CPU, contiguous copies), `args` as JSON (must be JSON-able).
    Raises `ReferenceUnavailable` when the environment is missing and `RuntimeError` with the
    reference's stderr when the call fails.
    """
    if not _IDENT.match(function):
        raise ValueError(f"reference function name {function!r} is not a Python identifier")
    from safetensors.torch import load_file, save_file

    python = reference_python()
    path = _resolve_file(file)
    try:
        args_json = json.dumps(args or {})
    except TypeError as e:
        raise TypeError(f"reference args must be JSON-able (numbers, strings, lists, dicts): {e}") from e
    with tempfile.TemporaryDirectory(prefix="qvl_ref_") as tmp:
        tmp_path = Path(tmp)
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in (tensors or {}).items()},
                  str(tmp_path / "inputs.safetensors"))
        (tmp_path / "args.json").write_text(args_json)
        cmd = [str(python), str(RUNNER), "--file", str(path), "--function", function, "--dir", str(tmp_path)]
        # the main env's PYTHONPATH/PYTHONHOME would put transformers 4.57 in front of the reference's own
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT), env=env)  # noqa: S603
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"reference call {path.name}:{function} failed (exit {proc.returncode}) "
                               f"under {python}:\n{tail}")
        out = tmp_path / "outputs.safetensors"
        if not out.is_file():
            raise RuntimeError(f"reference call {path.name}:{function} wrote no outputs.safetensors")
        return dict(load_file(str(out)))
