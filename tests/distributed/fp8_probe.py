"""grad_probe.py with the torch FP8 backend (`train.fp8=hybrid train.fp8_backend=torch`) on the CPU.

    torchrun --nproc_per_node=N tests/distributed/fp8_probe.py OUT.pt DATA_ROOT [hydra overrides…]

The CPU has no FP8 tensor cores, so the config check that refuses explicit FP8 there is told this machine
has them; the GEMMs then run the backend's CPU emulation (qvl_train/models/fp8.py), the rest of the step is
grad_probe.py's (one step, gradients assembled at full shape on rank 0).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def enable_fp8() -> None:
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.models import specs

    specs.gpu_fp8_capable = lambda: (True, "CPU emulation of FP8 tensor cores (test)")
    init = MegatronEngine.__init__

    def init_fp8(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "fp8": "hybrid", "fp8_backend": "torch"})

    MegatronEngine.__init__ = init_fp8


if __name__ == "__main__":  # required: dist_checkpointing saves through worker processes
    enable_fp8()
    from tests.distributed.grad_probe import main

    main(*sys.argv[1:])
