"""Ring reduce-scatter / all-gather / all-reduce on send/recv: equal to the library, bytes as modelled."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from loom.distributed.comm import Comm, Ledger
from loom.distributed.ring import (
    ring_all_gather,
    ring_all_gather_time,
    ring_all_reduce,
    ring_all_reduce_time,
    ring_bytes_sent,
    ring_reduce_scatter,
    ring_reduce_scatter_time,
)
from loom.distributed.spawn import run_ranks

LENGTHS = (1, 7, 13, 1001, 60)  # 60: a multiple of every group size 2..5
# Subgroups of the 5-rank world, so one spawn covers ring sizes 2..5 with non-trivial rank maps.
SUBGROUPS = ([1, 3], [0, 2, 4], [1, 2, 3, 4])


def _ring_bytes(ledger: Ledger, since: int) -> int:
    entries = [e for e in ledger.recent(10_000) if e.seq > since]
    assert all(e.tag == "ring" and e.op in ("send", "recv") for e in entries)
    return sum(e.bytes_sent for e in entries)


def _check_ring(comm: Comm, ledger: Ledger) -> dict:
    n, r = comm.size, comm.rank
    gen = torch.Generator().manual_seed(7 + dist.get_rank())
    all_reduce_bytes = {}
    checks = 0
    for length in LENGTHS:
        sizes = [c.numel() for c in torch.tensor_split(torch.empty(length), n)]
        s = length * 4
        for op in ("sum", "max", "min"):
            # small integers in float32: sums are exact in any order, so results are bitwise equal
            x = torch.randint(-50, 50, (length,), generator=gen).float()
            before = x.clone()
            expected = x.clone()
            comm.all_reduce(expected, op=op)

            seq = ledger.recent(1)[0].seq
            got = ring_all_reduce(x, comm, op=op)
            assert torch.equal(got, expected), (n, length, op)
            sent = _ring_bytes(ledger, seq)
            assert sent == 4 * (2 * length - sizes[r] - sizes[(r + 1) % n]), (n, length, sent)
            if length % n == 0:
                assert sent == ring_bytes_sent("all_reduce", n, s)
            all_reduce_bytes[(length, op)] = sent

            seq = ledger.recent(1)[0].seq
            mine = ring_reduce_scatter(x, comm, op=op)
            assert torch.equal(mine, torch.tensor_split(expected, n)[r]), (n, length, op)
            sent = _ring_bytes(ledger, seq)
            assert sent == 4 * (length - sizes[r])
            if length % n == 0:
                out = torch.empty(length // n)
                comm.reduce_scatter(out, x, op=op)
                assert torch.equal(mine, out)
                assert sent == ring_bytes_sent("reduce_scatter", n, s)
            assert torch.equal(x, before)  # inputs untouched
            checks += 1

        # random floats: same values up to summation order
        x = torch.randn(length, generator=gen)
        expected = x.clone()
        comm.all_reduce(expected)
        torch.testing.assert_close(ring_all_reduce(x, comm), expected, rtol=1e-5, atol=1e-5)

    for shape in ((1,), (3,), (2, 5)):
        chunk = torch.randn(*shape, generator=gen)
        expected = torch.empty(n * shape[0], *shape[1:])
        comm.all_gather(expected, chunk)
        seq = ledger.recent(1)[0].seq
        got = ring_all_gather(chunk, comm)
        assert torch.equal(got, expected), (n, shape)
        assert _ring_bytes(ledger, seq) == ring_bytes_sent("all_gather", n, expected.numel() * 4)
        checks += 1

    # other dtypes and shapes: int64 sum, a 2-D tensor, an empty one
    x = torch.arange(24, dtype=torch.int64).reshape(4, 6) * (dist.get_rank() + 1)
    expected = x.clone()
    comm.all_reduce(expected)
    assert torch.equal(ring_all_reduce(x, comm), expected)
    assert ring_all_reduce(torch.empty(0), comm).shape == (0,)
    with pytest.raises(ValueError, match="ring op"):
        ring_all_reduce(x, comm, op="avg")
    return {"checks": checks, "bytes": all_reduce_bytes}


def _ring_body() -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ledger = Ledger(rank)
    out = {"world": _check_ring(Comm.world(ledger), ledger)}
    if world_size == 5:
        for ranks in SUBGROUPS:
            group = dist.new_group(ranks)  # every rank creates every group
            if rank in ranks:
                out[tuple(ranks)] = _check_ring(Comm(f"g{len(ranks)}", group, ranks, ledger), ledger)
    return out


@pytest.mark.parametrize("world_size", [2, 5])
def test_ring_equals_library(world_size: int) -> None:
    results = run_ranks(_ring_body, world_size, timeout_s=120)
    groups = [(tuple(range(world_size)), "world")]
    if world_size == 5:
        groups += [(tuple(g), tuple(g)) for g in SUBGROUPS]
    for ranks, key in groups:
        n = len(ranks)
        per_rank = [results[g][key] for g in ranks]
        assert all(res["checks"] == 3 * len(LENGTHS) + 3 for res in per_rank)
        # over the ring every chunk travels n-1 hops in each phase: 2(n-1) * S in total
        for length in LENGTHS:
            for op in ("sum", "max", "min"):
                total = sum(res["bytes"][(length, op)] for res in per_rank)
                assert total == 2 * (n - 1) * length * 4, (n, length, op)


def test_single_rank_ring_is_a_copy() -> None:
    ledger = Ledger(0)
    solo = Comm("dp", None, [0], ledger)
    x = torch.arange(5.0)
    y = ring_all_reduce(x, solo)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert torch.equal(ring_reduce_scatter(x, solo, op="max"), x)
    assert torch.equal(ring_all_gather(x, solo), x)
    assert ledger.recent(10) == []


def test_cost_model() -> None:
    n, s, alpha, beta, gamma = 4, 1_000_000, 1e-5, 1e-9, 1e-10
    assert ring_all_reduce_time(n, s, alpha, beta, gamma) == pytest.approx(6e-5 + 1.5e-3 + 7.5e-5)
    assert ring_reduce_scatter_time(n, s, alpha, beta, gamma) == pytest.approx(3e-5 + 7.5e-4 + 7.5e-5)
    assert ring_all_gather_time(n, s, alpha, beta) == pytest.approx(3e-5 + 7.5e-4)
    # all-reduce = reduce-scatter + all-gather, for any n
    for k in (2, 3, 8, 64):
        assert ring_all_reduce_time(k, s, alpha, beta, gamma) == pytest.approx(
            ring_reduce_scatter_time(k, s, alpha, beta, gamma) + ring_all_gather_time(k, s, alpha, beta)
        )
    # bandwidth term tends to 2 S beta as n grows; latency term grows linearly
    assert ring_all_reduce_time(1024, s, 0, beta, 0) == pytest.approx(2 * s * beta, rel=1e-2)
    assert ring_all_reduce_time(1, s, alpha, beta, gamma) == 0.0
    assert ring_bytes_sent("all_reduce", 4, 4000) == 6000
    assert ring_bytes_sent("reduce_scatter", 4, 4000) == ring_bytes_sent("all_gather", 4, 4000) == 3000
    assert ring_bytes_sent("all_reduce", 3, 28) == pytest.approx(112 / 3)
    assert ring_bytes_sent("all_reduce", 1, 4000) == 0
    with pytest.raises(ValueError):
        ring_bytes_sent("broadcast", 4, 4000)
