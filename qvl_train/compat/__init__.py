"""Every patch qvl-train applies to a third-party library, in one place, each pinned to the release it patches.

A shim reaches into another project's internals (a module-level name, a private helper), so it is
only correct for the exact release it was written against. Each `install_*` / context manager here
calls `require_pinned(dist)` at the moment it patches, and refuses with a message that names the pin
when another release is installed, instead of failing later somewhere inside that library.

* `megatron_cpu.install_cpu_compat()` — megatron-core's hard-coded CUDA uses redirected to the CPU
  (TP/SP/PP/MoE/distributed optimizer under gloo); only when `torch.cuda.is_available()` is False.
  `megatron_cpu.spawn_gloo` runs a function in N gloo processes with it installed (tests, tools).
* `megatron_moe.install_moe_without_te()` — megatron-core's MoE router without Transformer Engine
  (binds the `te_general_gemm` name the router tests, which only exists when TE imports).
* `deepspeed_comm.skip_shm_build()` — DeepSpeed's `init_distributed` without JIT-compiling its
  shared-memory all-reduce op (inference only; a C++ build of about a minute on CPU machines).

Importing this package imports neither megatron-core nor DeepSpeed; each submodule imports its
library when its shim is installed. To update a pin: re-read the patched code of the new release
(each submodule names the functions it touches), adjust the shim, then `PINS`, pyproject.toml and
constraints.txt together, and run `tests/unit/test_cpu_compat.py`, `tests/unit/test_compat.py`,
`tests/distributed/` and `tests/parity/test_qwen3_vl_moe_parity.py`.
"""

from __future__ import annotations

import importlib.metadata

__all__ = ["PINS", "PinMismatch", "installed_version", "require_pinned"]

PINS: dict[str, str] = {"megatron-core": "0.16.1", "deepspeed": "0.19.8"}
"""Distribution name → the release the shims of this package were written against (as pyproject.toml pins)."""


class PinMismatch(RuntimeError):
    """A shim was about to patch a release of a library other than the one it was written for."""


def installed_version(dist: str) -> str | None:
    """The installed version of distribution `dist` (as pip reports it), or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_pinned(dist: str) -> None:
    """Raise `PinMismatch` unless `dist` is installed at exactly `PINS[dist]` (a local build label,
    `0.16.1+abc`, counts as that release)."""
    wanted = PINS[dist]
    have = installed_version(dist)
    if have is not None and have.split("+", 1)[0] == wanted:
        return
    raise PinMismatch(
        f"qvl_train.compat patches {dist}=={wanted} (its internals, which change between releases), "
        f"but {f'{dist}=={have}' if have else f'no {dist}'} is installed. "
        f"Install the pinned stack: pip install -c constraints.txt -e ."
    )
