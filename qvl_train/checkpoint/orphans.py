"""No helper process outlives its rank: the asynchronous checkpoint writer's processes die with their parent.

An async save (`checkpoint.async_save=true`) starts three kinds of processes from a rank: megatron-core's
writer (forked), the file writers it forks, and a `multiprocessing` Manager that carries the write
results (spawned by megatron's `_get_write_results_queue`). When a rank is killed with SIGKILL nothing
in it runs any more, so no `atexit` or finaliser can stop them: the Manager in particular just waits on
its socket forever (hundreds of MB, found alive long after torchrun had exited).

`install()` (called by `CheckpointManager` when `async_save` is on, before the first save) makes each
of them exit with its parent:

* every process later forked through `multiprocessing` from this process (and, recursively, from
  those) asks the kernel for SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`), then checks
  that the parent did not die before that request; where `prctl` does not exist (not Linux) or the
  fork came from a thread other than the main one (PDEATHSIG follows the forking *thread*), a daemon
  thread polls the parent pid instead;
* the results Manager is started here, through the same mechanism as its initializer, and handed to
  megatron in place of the one it would spawn.

Nothing here is needed for a clean run: `CheckpointManager.close()` completes or kills the writer.
This module imports only the standard library (the spawned Manager imports it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time

__all__ = ["install", "die_with_parent"]

PR_SET_PDEATHSIG = 1
_state = {"installed": False, "owner": os.getpid(), "forked_from_main": True, "manager": None}


class _Token:
    """`register_after_fork` keeps a weak reference to an object: this module-lifetime one."""


_TOKEN = _Token()


def _watch_parent(parent: int, period_s: float) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(period_s)


def die_with_parent(parent: int, *, use_prctl: bool = True, period_s: float = 0.5) -> str:
    """Make this process exit when `parent` (its parent's pid) dies; returns how ("prctl" or "watchdog").

    The check after `prctl` closes the race where the parent died between the fork and the request."""
    how = "watchdog"
    if use_prctl:
        libc_name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
            if libc is not None and libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)
    if how == "watchdog":
        threading.Thread(target=_watch_parent, args=(parent, period_s), name="qvl-parent-watch", daemon=True).start()
    return how


def _before_fork() -> None:  # in the parent, just before any fork: which thread forks
    _state["forked_from_main"] = threading.current_thread() is threading.main_thread()


def _after_fork(_token) -> None:  # in every child `multiprocessing` forks
    parent = _state["owner"]
    _state["owner"] = os.getpid()  # for this child's own children
    die_with_parent(parent, use_prctl=_state["forked_from_main"])


def _manager_init(parent: int) -> None:  # in the spawned Manager process, before it serves
    die_with_parent(parent)


def install() -> None:
    """Once per process; afterwards every `multiprocessing` child dies with this process (see above)."""
    if _state["installed"]:
        return
    _state["installed"], _state["owner"] = True, os.getpid()
    os.register_at_fork(before=_before_fork)
    multiprocessing.util.register_after_fork(_TOKEN, _after_fork)
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:  # megatron would spawn its own Manager at the first save
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_manager_init, initargs=(os.getpid(),))
        _state["manager"] = manager
        filesystem_async._results_queue = manager.Queue()
