"""`launch/train.py` whose rank 1 is killed with SIGKILL while its first asynchronous save is being written.

Invoked by test_async_save_kill.py under torchrun (arguments after the probe are launch/train.py's overrides):
    torchrun --nproc_per_node=2 tests/e2e/kill_save_probe.py +experiment=tiny checkpoint.async_save=true ...

The writer process megatron forks for the save sleeps 60 s before writing (so the save is deterministically
still in flight), and rank 1 kills itself with SIGKILL right after `CheckpointManager.save` has handed the
save to that writer: no handler, finaliser or `atexit` of rank 1 runs.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def inject() -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from qvl_train.checkpoint.manager import CheckpointManager

    write = FileSystemWriterAsync.write_preloaded_data_multiproc

    def slow_write(*args, **kwargs):
        time.sleep(60)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow_write)
    save = CheckpointManager.save

    def save_then_die(self, engine, state):
        step_dir = save(self, engine, state)
        if os.environ.get("RANK") == "1":
            print(f"rank 1: save of {step_dir} in flight, writer and results Manager started; SIGKILL", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return step_dir

    CheckpointManager.save = save_then_die


if __name__ == "__main__":  # required: dist_checkpointing saves through worker processes
    inject()
    sys.argv = [str(ROOT / "launch" / "train.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
