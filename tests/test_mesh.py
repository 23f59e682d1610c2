"""ParallelDims: the rank grid (pp, dp, tp) and layout validation before any process starts."""

from __future__ import annotations

import pytest

from loom.config import ParallelConfig, load_config
from loom.distributed.mesh import Coords, ParallelDims
from loom.errors import LoomError


def test_tp_is_innermost_then_dp_then_pp() -> None:
    dims = ParallelDims(dp=2, tp=2, pp=2)
    assert dims.coords(0) == Coords(pp=0, dp=0, tp=0)
    assert dims.coords(1) == Coords(pp=0, dp=0, tp=1)
    assert dims.coords(2) == Coords(pp=0, dp=1, tp=0)
    assert dims.coords(4) == Coords(pp=1, dp=0, tp=0)
    assert dims.group_ranks("tp", 5) == [4, 5]
    assert dims.group_ranks("dp", 5) == [5, 7]
    assert dims.group_ranks("pp", 5) == [1, 5]
    for rank in range(8):
        assert dims.rank_of(dims.coords(rank)) == rank


@pytest.mark.parametrize("dim", ["dp", "tp", "pp"])
def test_groups_partition_the_world(dim: str) -> None:
    dims = ParallelDims(dp=3, tp=2, pp=2)
    groups = dims.all_groups(dim)
    assert sorted(r for g in groups for r in g) == list(range(12))
    assert all(len(g) == getattr(dims, dim) for g in groups)


def test_dp_is_derived_from_the_world_size() -> None:
    assert ParallelDims.resolve(ParallelConfig(tp=2), 8) == ParallelDims(dp=4, tp=2, pp=1)
    assert ParallelDims.resolve(ParallelConfig(), 3) == ParallelDims(dp=3)


@pytest.mark.parametrize(
    ("cfg", "world", "words"),
    [
        (ParallelConfig(dp=2, tp=2), 6, ["2 x 2 x 1 = 4", "6 processes"]),
        (ParallelConfig(tp=4), 6, ["parallel.tp x parallel.pp", "multiple of 4"]),
        (ParallelConfig(tp=0), 4, ["parallel.tp = 0"]),
        (ParallelConfig(dp=-1), 4, ["parallel.dp = -1"]),
        (ParallelConfig(), 0, ["world size is 0"]),
    ],
)
def test_invalid_layouts_are_rejected_with_the_numbers(cfg: ParallelConfig, world: int, words: list[str]) -> None:
    with pytest.raises(LoomError) as err:
        ParallelDims.resolve(cfg, world)
    for word in words:
        assert word in str(err.value)
    assert err.value.fix


def test_config_rejects_nonpositive_sizes() -> None:
    with pytest.raises(LoomError, match="parallel.pp"):
        load_config(None, ["parallel.pp=0"])
    with pytest.raises(LoomError, match="ddp.bucket_mb"):
        load_config(None, ["ddp.bucket_mb=-1"])


def _cores_of(affinity: str, before: list[int]) -> tuple[list[int], int]:
    """What share_cores leaves this rank: its cores and its torch threads (run_ranks set 1 thread)."""
    import os

    import torch

    from loom.distributed.context import share_cores

    os.sched_setaffinity(0, before)  # the host's cores, as the launcher gave them
    share_cores(torch.device("cpu"), affinity)
    return sorted(os.sched_getaffinity(0)), torch.get_num_threads()


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_cpu_ranks_of_one_host_split_its_cores() -> None:
    """Each of N local ranks gets cores / N threads and, with affinity auto, its own slice of the
    cores; with none the OS places them (and the threads are split all the same)."""
    import os

    from loom.distributed.spawn import run_ranks

    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // 2)
    pinned = run_ranks(_cores_of, 2, args=("auto", cores), timeout_s=60, init=False)
    if len(cores) >= 2:
        assert [c for c, _ in pinned] == [cores[:share], cores[share : 2 * share]]
    assert {threads for _, threads in pinned} == {share}
    free = run_ranks(_cores_of, 2, args=("none", cores), timeout_s=60, init=False)
    assert [c for c, _ in free] == [cores, cores] and {t for _, t in free} == {share}


def test_threads_per_rank_split_the_usable_cores_unless_the_user_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """What share_cores gives each rank, and what the host allocation policy decides by."""
    import os

    from loom.distributed.context import threads_per_rank

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert [threads_per_rank(n) for n in (1, 2, 3, 4, 6, 12)] == [6, 3, 2, 1, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads_per_rank(2) == 5


def _thread_cores() -> tuple[list[int], list[list[int]]]:
    """After init_distributed on this rank: the calling thread's cores, and each message thread's
    of the backend (gloo's loops, named by the backend)."""
    import os

    from loom.distributed.context import init_distributed

    ctx = init_distributed(load_config(None, ["parallel.tp=2"]).parallel, "cpu")
    backend = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as f:
            if "gloo" in f.read():
                backend.append(sorted(os.sched_getaffinity(int(tid))))
    mine = sorted(os.sched_getaffinity(0))
    ctx.shutdown()
    return mine, backend


@pytest.mark.skipif(
    not hasattr(__import__("os"), "sched_setaffinity") or len(__import__("os").sched_getaffinity(0)) < 2,
    reason="needs Linux CPU affinity and 2 cores",
)
def test_ranks_are_pinned_but_the_backends_message_threads_are_not() -> None:
    """A rank's compute thread runs on its own core; the threads that move its messages, started
    with the process groups, may run on any (pinned beside their rank's compute they queue behind
    it: tp 2 through loom train ran 6% slower)."""
    import os

    from loom.distributed.spawn import run_ranks

    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // 2
    ranks = run_ranks(_thread_cores, 2, timeout_s=60, init=False)
    assert [mine for mine, _ in ranks] == [cores[:share], cores[share : 2 * share]]
    for _, backend in ranks:
        assert backend and all(c == cores for c in backend)
