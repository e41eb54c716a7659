"""DeepSpeed 0.19.8's `init_distributed` without building its shared-memory all-reduce op.

`deepspeed.comm.torch.TorchBackend.__init__` calls the module-level `build_shm_op()`, which on the
CPU accelerator JIT-compiles a C++ shared-memory all-reduce (about a minute, a compiler needed). Only
DeepSpeed *inference* uses it; training collectives go through torch.distributed. Inside
`skip_shm_build()` that name returns None, as it does itself where the op is not compatible, and the
backend then runs without it. Used by `engines/deepspeed.py`'s
`_init_deepspeed_comm`.
"""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

from qvl_train.compat import require_pinned

__all__ = ["skip_shm_build"]


@contextlib.contextmanager
def skip_shm_build():
    """Within the block, DeepSpeed's torch communication backend does not build its shm op."""
    require_pinned("deepspeed")
    backend = importlib.import_module("deepspeed.comm.torch")  # the module (the package re-exports `torch`)
    with mock.patch.object(backend, "build_shm_op", lambda: None):
        yield
