"""Counted collectives: each wrapped op equals torch's own, and the ledger holds the byte model."""

from __future__ import annotations

import os
import re
import threading
import time
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist

import loom.distributed.comm as comm_module
from loom.distributed.comm import Comm, Ledger, model_bytes
from loom.distributed.spawn import run_ranks

SUM, MAX, MIN = dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN
TORCH_OP = {"sum": SUM, "max": MAX, "min": MIN, "avg": SUM}


def _expected(numerator: int, denominator: int) -> int | float:
    """numerator / denominator as the ledger must hold it: int when whole, float otherwise."""
    return numerator // denominator if numerator % denominator == 0 else numerator / denominator


def _same(value: int | float, expected: int | float) -> bool:
    return value == expected and type(value) is type(expected)


# ---------------------------------------------------------------- per-rank bodies


def _check_comm(comm: Comm, group, ledger: Ledger) -> int:
    """Every wrapped primitive against torch on clones, with its ledger entry; returns #checks."""
    n, r = comm.size, comm.rank
    gen = torch.Generator().manual_seed(1000 + dist.get_rank())
    checks = 0

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def last(op: str, nbytes: int | float) -> None:
        nonlocal checks
        e = ledger.recent(1)[0]
        assert (e.op, e.group, e.ranks) == (op, comm.name, comm.ranks), e
        assert e.finished is not None and e.dtype == "float32", e
        assert _same(e.bytes_sent, nbytes), (op, e.bytes_sent, nbytes, n, r)
        checks += 1

    def divide(t: torch.Tensor, op: str) -> torch.Tensor:
        return t / n if op == "avg" else t

    # all_reduce: sync and async, every op, sizes with and without a whole byte count
    for op in ("sum", "max", "min", "avg"):
        for numel in (1, 7, 12):
            x = rnd(numel)
            y = x.clone()
            assert comm.all_reduce(x, op=op, tag="t") is None
            dist.all_reduce(y, op=TORCH_OP[op], group=group)
            assert torch.equal(x, divide(y, op)), (op, numel)
            last("all_reduce", _expected(2 * (n - 1) * numel * 4, n))
        x = rnd(2, 3)
        y = x.clone()
        handle = comm.all_reduce(x, op=op, async_op=True)
        assert [e.op for e in ledger.pending()] == ["all_reduce"]
        assert handle.wait() and handle.wait()  # idempotent
        assert ledger.pending() == []
        dist.all_reduce(y, op=TORCH_OP[op], group=group)
        assert torch.equal(x, divide(y, op))
        last("all_reduce", _expected(2 * (n - 1) * 24, n))
    with pytest.raises(TypeError, match="avg"):
        comm.all_reduce(torch.ones(3, dtype=torch.int64), op="avg")
    with pytest.raises(ValueError, match="reduce op"):
        comm.all_reduce(torch.ones(3), op="mean")

    # reduce_scatter and all_gather: the fused op and the fallback give torch's result
    m = 3
    fallback = Comm(comm.name, comm.group, comm.ranks, ledger, fallback=True)
    for c, note in ((comm, ""), (fallback, "fallback")):
        for op in ("sum", "max", "avg"):
            for async_op in (False, True):
                x = rnd(n * m)
                out = torch.zeros(m)
                x_ref, out_ref = x.clone(), torch.zeros(m)
                handle = c.reduce_scatter(out, x, op=op, async_op=async_op, tag="grad")
                if async_op:
                    handle.wait()
                dist.reduce_scatter_single(out_ref, x_ref, op=TORCH_OP[op], group=group)
                assert torch.equal(out, divide(out_ref, op)) and torch.equal(x, x_ref), (op, note)
                last("reduce_scatter", (n - 1) * m * 4)
                assert note in ledger.recent(1)[0].note
        for async_op in (False, True):
            x = rnd(2, m)
            out = torch.zeros(2 * n, m)
            out_ref = torch.zeros(2 * n, m)
            handle = c.all_gather(out, x, async_op=async_op)
            if async_op:
                handle.wait()
            dist.all_gather_single(out_ref, x.clone(), group=group)
            assert torch.equal(out, out_ref), note
            last("all_gather", (n - 1) * 2 * m * 4)
            assert note in ledger.recent(1)[0].note

    for root in range(n):
        # broadcast: pipelined chain from root; the chain's last rank sends nothing
        x = rnd(5)
        y = x.clone()
        comm.broadcast(x, src=root)
        dist.broadcast(y, src=comm.ranks[root], group=group)
        assert torch.equal(x, y)
        last("broadcast", 0 if (r - root) % n == n - 1 else 20)

        # reduce: only the destination's tensor is defined
        for op, numel in (("sum", 6), ("avg", 5), ("max", 5)):
            x = rnd(numel)
            y = x.clone()
            comm.reduce(x, dst=root, op=op)
            dist.reduce(y, dst=comm.ranks[root], op=TORCH_OP[op], group=group)
            if r == root:
                assert torch.equal(x, divide(y, op)), op
            s = numel * 4
            last("reduce", _expected((n - 1) * s, n) if r == root else s)

        # scatter: the source sends every other rank its piece
        pieces = [rnd(m) for _ in range(n)] if r == root else None
        out, out_ref = torch.zeros(m), torch.zeros(m)
        comm.scatter(out, pieces, src=root)
        dist.scatter(out_ref, [p.clone() for p in pieces] if pieces else None, src=comm.ranks[root], group=group)
        assert torch.equal(out, out_ref)
        last("scatter", (n - 1) * m * 4 if r == root else 0)

        # gather: every other rank sends the destination its piece
        x = rnd(m)
        outs = [torch.zeros(m) for _ in range(n)] if r == root else None
        refs = [torch.zeros(m) for _ in range(n)] if r == root else None
        handle = comm.gather(x, outs, dst=root, async_op=True)
        handle.wait()
        dist.gather(x.clone(), refs, dst=comm.ranks[root], group=group)
        if r == root:
            assert all(torch.equal(a, b) for a, b in zip(outs, refs))
        last("gather", 0 if r == root else m * 4)

    # all_to_all with equal splits
    x = rnd(n * m)
    out, out_ref = torch.zeros(n * m), torch.zeros(n * m)
    comm.all_to_all(out, x)
    dist.all_to_all_single(out_ref, x.clone(), group=group)
    assert torch.equal(out, out_ref)
    last("all_to_all", (n - 1) * m * 4)

    # point to point around the ring, blocking (rank 0 sends first) then non-blocking
    right, left = (r + 1) % n, (r - 1) % n
    mine = torch.full((4,), float(comm.ranks[r]))
    got = torch.zeros(4)
    if r == 0:
        comm.send(mine, dst=right, tag="p2p")
        last("send", 16)
        comm.recv(got, src=left)
        last("recv", 0)
    else:
        comm.recv(got, src=left)
        last("recv", 0)
        comm.send(mine, dst=right)
        last("send", 16)
    assert torch.equal(got, torch.full((4,), float(comm.ranks[left])))
    got = torch.zeros(4)
    send = comm.isend(mine, dst=right)
    recv = comm.irecv(got, src=left)
    recv.wait()
    send.wait()
    assert torch.equal(got, torch.full((4,), float(comm.ranks[left])))
    with pytest.raises(ValueError, match="itself"):
        comm.send(mine, dst=r)

    comm.barrier()
    e = ledger.recent(1)[0]
    assert (e.op, e.bytes_sent) == ("barrier", 0)
    return checks


def _check_automatic_fallback(world: Comm, ledger: Ledger) -> int:
    """A backend that refuses the fused ops switches the Comm to its fallbacks, same results."""
    n = world.size

    def refuse(*args, **kwargs):
        raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")

    saved = comm_module._reduce_scatter_single, comm_module._all_gather_single
    comm_module._reduce_scatter_single = comm_module._all_gather_single = refuse
    try:
        for op_name in ("reduce_scatter", "all_gather"):
            c = Comm("world", None, world.ranks, ledger)
            x = torch.arange(2.0 * n) + world.rank
            if op_name == "reduce_scatter":
                out = torch.zeros(2)
                c.reduce_scatter(out, x)
                ref = torch.zeros(2)
                dist.reduce_scatter_single(ref, x.clone())
                nbytes = x.numel() * 4
            else:
                out, ref = torch.zeros(2 * n * n), torch.zeros(2 * n * n)
                c.all_gather(out, x)
                dist.all_gather_single(ref, x.clone())
                nbytes = out.numel() * 4
            e = ledger.recent(1)[0]
            assert c.fallback and e.op == op_name and e.note.startswith("fallback"), e
            assert e.bytes_sent == (n - 1) * nbytes // n and torch.equal(out, ref)
    finally:
        comm_module._reduce_scatter_single, comm_module._all_gather_single = saved
    return 2


def _primitives() -> dict:
    world_size, rank = dist.get_world_size(), dist.get_rank()
    ledger = Ledger(rank)
    world = Comm.world(ledger)
    assert (world.size, world.rank) == (world_size, rank)
    checks = _check_comm(world, None, ledger)
    checks += _check_automatic_fallback(world, ledger)

    # subgroups: even and odd ranks (group ranks differ from global ranks)
    evens, odds = list(range(0, world_size, 2)), list(range(1, world_size, 2))
    groups = {tuple(evens): dist.new_group(evens)}
    if len(odds) > 1:
        groups[tuple(odds)] = dist.new_group(odds)
    for ranks, group in groups.items():
        if rank in ranks and len(ranks) > 1:
            dp = Comm("dp", group, ranks, ledger)
            assert dp.rank == ranks.index(rank)
            with pytest.raises(ValueError, match="process group holds"):
                Comm("dp", group, list(reversed(ranks)), ledger)
            checks += _check_comm(dp, group, ledger)

    # step totals: every byte since the last call, by group, then reset
    recent = [e for e in ledger.recent(1000) if e.finished is not None]
    assert len(recent) == ledger.recent(1)[0].seq  # nothing fell out of the history
    by_group: dict[str, float] = {}
    for e in recent:
        by_group[e.group] = by_group.get(e.group, 0.0) + e.bytes_sent
    step = ledger.take_step_totals()
    assert set(step) >= {"comm_bytes_dp", "comm_bytes_tp", "comm_bytes_pp", "comm_bytes_world"}
    assert step["comm_bytes_tp"] == 0 and step["comm_bytes_pp"] == 0
    for group_name, total in by_group.items():
        assert step[f"comm_bytes_{group_name}"] == pytest.approx(total, rel=1e-12)
        assert ledger.totals()[group_name] == step[f"comm_bytes_{group_name}"]
    assert all(v == 0 for v in ledger.take_step_totals().values())

    # describe(): a pending async call, then idle
    x = torch.ones(3)
    handle = world.all_reduce(x, async_op=True, tag="metrics")
    seq = ledger.recent(1)[0].seq
    waiting = ledger.describe()
    handle.wait()
    idle = ledger.describe()
    return {"checks": checks, "waiting": waiting, "idle": idle, "seq": seq, "step": step, "totals": ledger.totals()}


def _describe_expectations(results: list, world_size: int) -> None:
    ranks = list(range(world_size))
    for rank, res in enumerate(results):
        assert res["checks"] >= 49
        seq = res["seq"]
        assert res["waiting"].startswith(f"rank {rank}: waiting in all_reduce #{seq} on world group {ranks} for ")
        assert re.search(rf" for \d+\.\d s; last completed: \w+ #{seq - 1} on \w+ group \[", res["waiting"])
        assert res["idle"] == (
            f"rank {rank}: not in a collective; last completed: all_reduce #{seq} on world group {ranks}"
        )


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_primitives_equal_torch_and_ledger_matches_model(world_size: int) -> None:
    results = run_ranks(_primitives, world_size, timeout_s=90)
    _describe_expectations(results, world_size)
    if world_size >= 3:  # ranks 0 and 2 form a dp subgroup
        assert results[0]["totals"]["dp"] > 0


def _polled_primitives() -> tuple[int, int]:
    """Every primitive against torch blocking, then again with each wait polling its work first
    (``spin_s`` > 0, as a CPU rank with a core of its own waits under ``parallel.comm_wait = "auto"``)."""
    ranks = range(dist.get_world_size())
    blocking, polled = (Comm("world", None, ranks, Ledger(dist.get_rank()), spin_s=s) for s in (0.0, 0.05))
    return _check_comm(blocking, None, blocking.ledger), _check_comm(polled, None, polled.ledger)


def test_polled_waits_give_the_same_results() -> None:
    for blocking, polled in run_ranks(_polled_primitives, 2, timeout_s=90):
        assert polled == blocking >= 40


class _FakeWork:
    """A work that reports completion after ``polls`` calls of is_completed (never if None)."""

    def __init__(self, polls: int | None) -> None:
        self.polls, self.asked, self.waited = polls, 0, False

    def is_completed(self) -> bool:
        self.asked += 1
        return self.polls is not None and self.asked >= self.polls

    def wait(self) -> bool:
        self.waited = True
        return True


def test_settle_polls_then_waits_and_never_polls_past_its_budget() -> None:
    done = _FakeWork(polls=3)
    comm_module.settle(done, spin_s=10.0)  # returns as soon as the work says it is complete
    assert done.asked == 3 and done.waited
    never = _FakeWork(polls=None)  # gloo's send and recv never say so: the budget ends the polling
    comm_module.settle(never, spin_s=0.01)
    assert never.asked > 1 and never.waited
    blocking = _FakeWork(polls=1)
    comm_module.settle(blocking)  # no budget: straight to wait, as before
    assert blocking.asked == 0 and blocking.waited


def test_spin_budget_polls_only_cpu_gloo_ranks_with_a_core_each(monkeypatch: pytest.MonkeyPatch) -> None:
    from loom.distributed.context import SPIN_S, spin_budget

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert spin_budget(cpu, "gloo") == SPIN_S > 0
    assert spin_budget(cpu, "gloo", "block") == 0
    assert spin_budget(cuda, "nccl") == spin_budget(cuda, "nccl", "poll") == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # more ranks than cores: a spinning rank would take another's
    assert spin_budget(cpu, "gloo") == 0
    assert spin_budget(cpu, "gloo", "poll") == SPIN_S


# ---------------------------------------------------------------- in-process: no ranks needed


def test_model_bytes_table() -> None:
    s = 1200
    assert model_bytes("all_reduce", 4, s) == 1800
    assert model_bytes("all_reduce", 3, 1000) == pytest.approx(4000 / 3)
    assert isinstance(model_bytes("all_reduce", 3, 1000), float)
    assert model_bytes("reduce_scatter", 4, s) == model_bytes("all_gather", 4, s) == 900
    assert model_bytes("all_to_all", 4, s) == 900
    assert [model_bytes("broadcast", 4, s, rank=k, root=2) for k in range(4)] == [s, 0, s, s]  # chain 2, 3, 0, 1
    assert [model_bytes("reduce", 4, s, rank=k, root=1) for k in range(4)] == [s, 900, s, s]
    assert [model_bytes("scatter", 4, s, rank=k, root=3) for k in range(4)] == [0, 0, 0, 900]
    assert [model_bytes("gather", 4, s, rank=k, root=0) for k in range(4)] == [0, 300, 300, 300]
    assert (model_bytes("send", 4, s), model_bytes("recv", 4, s), model_bytes("barrier", 4, 0)) == (s, 0, 0)
    assert all(model_bytes(op, 1, s) == 0 for op in ("all_reduce", "broadcast", "send"))
    with pytest.raises(ValueError):
        model_bytes("teleport", 2, s)


def test_group_of_one_does_nothing_and_records_nothing() -> None:
    ledger = Ledger(rank=5)
    solo = Comm("tp", None, [5], ledger)
    assert (solo.size, solo.rank) == (1, 0)
    x = torch.arange(6.0)
    solo.all_reduce(x, op="avg")
    assert solo.all_reduce(x, async_op=True).wait()
    assert torch.equal(x, torch.arange(6.0))
    out = torch.zeros(6)
    solo.reduce_scatter(out, x)
    assert torch.equal(out, x)
    out = torch.zeros(2, 3)
    solo.all_gather(out, x.view(2, 3), async_op=True).wait()
    assert torch.equal(out, x.view(2, 3))
    solo.broadcast(x, src=0)
    solo.reduce(x, dst=0, op="max")
    out = torch.zeros(6)
    solo.scatter(out, [x], src=0)
    assert torch.equal(out, x)
    outs = [torch.zeros(6)]
    solo.gather(x, outs, dst=0)
    assert torch.equal(outs[0], x)
    out = torch.zeros(6)
    solo.all_to_all(out, x)
    assert torch.equal(out, x)
    solo.barrier()
    assert ledger.recent(10) == [] and ledger.totals() == {}
    assert ledger.take_step_totals() == {"comm_bytes_dp": 0, "comm_bytes_tp": 0, "comm_bytes_pp": 0}
    with pytest.raises(ValueError, match="not in the"):
        Comm("dp", None, [0, 1], ledger)
    with pytest.raises(ValueError, match="src"):
        solo.broadcast(x, src=1)


def test_ledger_totals_step_and_describe() -> None:
    ledger = Ledger(rank=3, history=4)
    assert ledger.describe() == "rank 3: not in a collective; last completed: none"
    assert ledger.last_completed() is None
    # 2(n-1)/n * S for n=3, S=28: 112/3 bytes each, exact over many calls
    for _ in range(30):
        e = ledger.begin("all_reduce", "dp", [1, 3, 5], 7, "float32", Fraction(112, 3), tag="grad")
        assert isinstance(e.bytes_sent, float)
        ledger.end(e)
        ledger.end(e)  # idempotent
    assert ledger.totals() == {"dp": 1120}
    assert len(ledger.recent(100)) == 4  # bounded history
    rs = ledger.begin("reduce_scatter", "dp", [1, 3], 8, "float32", 16)
    ledger.end(rs)
    tp = ledger.begin("all_reduce", "tp", [2, 3], 4, "bfloat16", 8)
    ledger.end(tp)
    step = ledger.take_step_totals()
    assert step == {"comm_bytes_dp": 1136, "comm_bytes_tp": 8, "comm_bytes_pp": 0}
    assert ledger.take_step_totals() == {"comm_bytes_dp": 0, "comm_bytes_tp": 0, "comm_bytes_pp": 0}
    ledger.end(ledger.begin("broadcast", "embed", [0, 3], 2, "float32", 8))
    assert ledger.take_step_totals()["comm_bytes_embed"] == 8
    assert ledger.take_step_totals()["comm_bytes_embed"] == 0  # seen groups keep their key

    rs = ledger.begin("reduce_scatter", "dp", [1, 3], 8, "float32", 16)
    ledger.end(rs)
    ar = ledger.begin("all_reduce", "dp", [1, 3], 8, "float32", 32)
    ar.started -= 12.0  # as if it had been waiting 12 s
    text = ledger.describe()
    assert text == (
        f"rank 3: waiting in all_reduce #{ar.seq} on dp group [1, 3] for 12.0 s; "
        f"last completed: reduce_scatter #{rs.seq} on dp group [1, 3]"
    )
    assert [e.seq for e in ledger.pending()] == [ar.seq]
    assert ledger.last_completed().seq == rs.seq
    ledger.begin("all_gather", "dp", [1, 3], 8, "float32", 16)
    assert "(1 more pending)" in ledger.describe()


def test_a_settled_call_leaves_the_pending_list_and_counts_its_bytes_at_end() -> None:
    ledger = Ledger(rank=0)
    e = ledger.begin("all_gather", "world", [0, 1], 20, "float64", 80, tag="metrics")
    ledger.settle(e)  # the backend finished it (on its own thread): a watchdog must not see it stuck
    assert ledger.pending() == [] and e.finished is not None
    assert ledger.take_step_totals().get("comm_bytes_world", 0) == 0  # its bytes wait for the caller's end
    ledger.end(e)
    ledger.end(e)
    ledger.settle(e)  # settling or ending again changes nothing
    assert ledger.take_step_totals()["comm_bytes_world"] == 80
    assert ledger.totals() == {"world": 80} and ledger.last_completed().seq == e.seq


def _settled_gather(_: str) -> dict:
    ledger = Ledger(dist.get_rank())
    world = Comm.world(ledger)
    every = torch.empty(2 * 3, dtype=torch.float64)
    handle = world.all_gather(every, torch.full((3,), float(world.rank), dtype=torch.float64), async_op=True)
    handle.settle_on_completion()
    deadline = time.monotonic() + 60
    while ledger.pending() and time.monotonic() < deadline:  # the backend settles it without a wait
        time.sleep(0.01)
    settled = not ledger.pending()
    counted_before_wait = ledger.totals().get("world", 0)
    handle.wait()
    return {
        "settled": settled,
        "before": counted_before_wait,
        "after": ledger.totals()["world"],
        "every": every.tolist(),
    }


def test_settle_on_completion_takes_a_finished_gather_off_the_pending_list() -> None:
    for r in run_ranks(_settled_gather, 2, args=("",), timeout_s=120):
        assert r["settled"] and r["before"] == 0 and r["after"] == 24  # (n-1)/n x 48 bytes, at wait
        assert r["every"] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_ledger_is_thread_safe() -> None:
    ledger = Ledger(rank=0, history=50)

    def work() -> None:
        for _ in range(2000):
            ledger.end(ledger.begin("all_reduce", "dp", [0, 1], 1, "float32", 4))

    def watch(stop: threading.Event) -> None:
        while not stop.is_set():
            ledger.describe()
            ledger.pending()
            ledger.recent(10)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    watcher.join()
    assert ledger.totals() == {"dp": 4 * 2000 * 4}
    assert ledger.pending() == [] and ledger.recent(1)[0].seq == 8000
