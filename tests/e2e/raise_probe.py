"""`launch/train.py` with a training step that raises: every rank's engine fails at one step.

Invoked by test_teardown.py under torchrun (the arguments after the step are launch/train.py's overrides):
    torchrun --nproc_per_node=2 tests/e2e/raise_probe.py STEP +experiment=tiny output_dir=... ...

`MegatronEngine.train_step` is wrapped so that the 0-based step `STEP` raises
`RuntimeError("injected failure at step STEP")`, as a bug or a device error inside a step would.
"""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def inject(fail_at: int) -> None:
    from qvl_train.engines.megatron import MegatronEngine

    train_step = MegatronEngine.train_step

    def failing_step(self, batches, step):
        if step == fail_at:
            raise RuntimeError(f"injected failure at step {step}")
        return train_step(self, batches, step)

    MegatronEngine.train_step = failing_step


if __name__ == "__main__":  # required: dist_checkpointing saves through worker processes
    inject(int(sys.argv[1]))
    sys.argv = [str(ROOT / "launch" / "train.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
