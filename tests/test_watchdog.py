"""Never hang: a rank that raises, dies or stalls makes every survivor report and exit in time."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from loom.config import ParallelConfig
from loom.distributed.comm import Ledger
from loom.distributed.context import init_distributed
from loom.distributed.spawn import RankFailure, run_ranks
from loom.distributed.watchdog import EXIT_HANG, fail_loudly, failure_report

TIMEOUT_S = 4.0


def _victim(mode: str, run_dir: str) -> str:
    ctx = init_distributed(ParallelConfig(timeout_s=TIMEOUT_S))
    with fail_loudly(ctx.ledger, TIMEOUT_S, Path(run_dir)):
        for step in range(6):
            if ctx.rank == 1 and step == 3:
                if mode == "raise":
                    raise RuntimeError("boom in the model code")
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(600)  # "hang": stuck outside any collective
            ctx.comm("dp").all_reduce(torch.ones(1000), tag="grad")
    return "finished"


@pytest.mark.parametrize("mode", ["raise", "kill", "hang"])
def test_survivors_report_and_exit_within_the_timeout(tmp_path: Path, mode: str) -> None:
    began = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_ranks(_victim, 3, args=(mode, str(tmp_path)), timeout_s=40, collective_timeout_s=60)
    took = time.monotonic() - began
    assert took < 30, f"took {took:.1f} s"
    assert "finished" not in str(failure.value)
    for rank in (0, 2):  # the survivors each say where they were waiting
        report = (tmp_path / f"failure_rank{rank}.txt").read_text()
        assert f"rank {rank}: waiting in all_reduce #4 on dp group [0, 1, 2]" in report
        assert "last completed: all_reduce #3" in report
    if mode == "raise":
        assert "boom in the model code" in (tmp_path / "failure_rank1.txt").read_text()
    if mode == "hang":
        assert f"exit code {EXIT_HANG}" in str(failure.value)  # the watchdog ended the survivors


def test_report_names_the_wait_and_the_history() -> None:
    ledger = Ledger(rank=3)
    done = ledger.begin("reduce_scatter", "dp", [1, 3], 8, "float32", 16)
    ledger.end(done)
    ledger.begin("all_reduce", "dp", [1, 3], 8, "float32", 32, tag="grad")
    report = failure_report(ledger, "testing")
    assert report.startswith("rank 3: testing")
    assert "rank 3: waiting in all_reduce #2 on dp group [1, 3]" in report
    assert "last completed: reduce_scatter #1" in report
    assert "#2 all_reduce on dp group [1, 3]: 8 x float32, 32 bytes sent, pending, tag grad" in report


def _shm_victim(run_dir: str) -> str:
    """DDP over shared memory; rank 1 stalls before the third step's backward."""
    from loom.parallel.ddp import DataParallel

    ctx = init_distributed(ParallelConfig(timeout_s=TIMEOUT_S))
    model = torch.nn.Linear(64, 64)
    ddp = DataParallel(model, ctx.comm("dp"), bucket_mb=0.001, transport="shm", timeout_s=TIMEOUT_S)
    with fail_loudly(ctx.ledger, TIMEOUT_S, Path(run_dir)):
        for step in range(6):
            if ctx.rank == 1 and step == 2:
                time.sleep(600)  # no socket closes, no peer raises: only the watchdog can end rank 0's wait
            model(torch.ones(4, 64)).sum().backward()
            ddp.finish_gradient_sync()
            ddp.zero_grad()
    return "finished"


def test_a_stalled_peer_in_a_shared_memory_all_reduce_is_reported(tmp_path: Path) -> None:
    began = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_ranks(_shm_victim, 2, args=(str(tmp_path),), timeout_s=40, collective_timeout_s=60)
    assert time.monotonic() - began < 30
    assert f"exit code {EXIT_HANG}" in str(failure.value)
    report = (tmp_path / "failure_rank0.txt").read_text()
    assert "rank 0: waiting in all_reduce" in report and "on dp group [0, 1]" in report
    assert "pending, tag grad (shm)" in report  # the bucket stuck in shared memory, named as such


def _shm_quiesce_victim(run_dir: str) -> str:
    """DDP over shared memory (3 steps a bucket); rank 1 stops (SIGSTOP) just before the last step
    of the third sync: rank 0's buckets are done and it waits for rank 1 to finish reading them,
    a wait no ledger entry covers."""
    from loom.parallel.ddp import DataParallel

    ctx = init_distributed(ParallelConfig(timeout_s=TIMEOUT_S))
    model = torch.nn.Linear(64, 64)
    ddp = DataParallel(model, ctx.comm("dp"), bucket_mb=0.001, transport="shm", timeout_s=TIMEOUT_S)
    last = 3 * len(ddp.buckets) * 3  # the third sync's last step
    if ctx.rank == 1:
        say = ddp.shm._say

        def stop_before_the_last() -> None:
            if ddp.shm._said + 1 == last:  # this thread, now: os.kill's stop lands a moment later
                signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
            say()

        ddp.shm._say = stop_before_the_last
    with fail_loudly(ctx.ledger, TIMEOUT_S, Path(run_dir)):
        for _ in range(6):
            model(torch.ones(4, 64)).sum().backward()
            ddp.finish_gradient_sync()
            ddp.zero_grad()
    return "finished"


def test_a_peer_stopped_while_reading_shared_buckets_ends_the_wait_within_the_timeout(tmp_path: Path) -> None:
    """The wait for peers to finish reading (``quiesce``) raises after parallel.timeout_s, not the
    buckets' backstop 30 s later (a SIGSTOP there held a 4-rank run 40 s, timeout 10 s)."""
    began = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_ranks(_shm_quiesce_victim, 2, args=(str(tmp_path),), timeout_s=60, collective_timeout_s=60)
    assert time.monotonic() - began < 20
    assert "finished" not in str(failure.value)
    report = (tmp_path / "failure_rank0.txt").read_text()
    assert "rank 0: not in a collective" in report  # no ledger entry: the watchdog could not see it
    assert re.search(rf"rank 1 did not reach step \d+ within {TIMEOUT_S:g} s \(it died or is stuck\)", report)
