"""The hang report of a collective timeout: each rank that runs writes its stacks; a silent rank is named, not an empty file."""

from __future__ import annotations

import os
import time

import pytest

from qvl_train.monitor.diagnose import StackDumper


def test_timeout_names_the_ranks_that_wrote_no_stacks(tmp_path):
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    (stacks / "rank1.txt").write_text("=== rank 1 ... step 3: SIGUSR2\n(old stacks)\n")  # before the hang: stale
    old = time.time() - 60
    os.utime(stacks / "rank1.txt", (old, old))
    dead = StackDumper(tmp_path, rank=3, stall_s=30, world=4)  # opened its (empty) file at start, never wrote
    peer = StackDumper(tmp_path, rank=2, stall_s=30, world=4, peer_wait_s=0.3)
    me = StackDumper(tmp_path, rank=0, stall_s=30, world=4, peer_wait_s=0.3)
    for d in (peer, me):
        d.heartbeat(5)
    peer.dump("collective timed out: peer")  # rank 2 can still run: it writes its own stacks
    with pytest.raises(SystemExit) as exit_info:
        with me:
            raise RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv")
    dead.close()
    peer.close()
    message = str(exit_info.value)
    assert "Every rank that can still run wrote its stacks to" in message and "summary.txt" in message

    summary = (stacks / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("=== hang report by rank 0 at ") and "after step 5" in summary[0]
    assert summary[1:] == [
        "rank 0: stacks in rank0.txt",
        "rank 1: no stacks (stopped or dead)",
        "rank 2: stacks in rank2.txt",
        "rank 3: no stacks (stopped or dead)",
    ]
    assert "collective timed out" in (stacks / "rank0.txt").read_text()
    for r in (1, 3):  # the silent ranks' files say so instead of being empty (or holding only older stacks)
        assert "no stacks (stopped or dead)" in (stacks / f"rank{r}.txt").read_text()
    assert "no stacks" not in (stacks / "rank2.txt").read_text()


def test_every_rank_that_times_out_appends_its_report(tmp_path):
    dumpers = [StackDumper(tmp_path, rank=r, stall_s=30, world=2, peer_wait_s=0.2) for r in (0, 1)]
    for d in dumpers:
        d.heartbeat(1)
        d.dump("collective timed out")
    for d in dumpers:
        d.hang_report()
        d.close()
    text = (tmp_path / "stacks" / "summary.txt").read_text()
    assert text.count("=== hang report") == 2 and "no stacks" not in text
