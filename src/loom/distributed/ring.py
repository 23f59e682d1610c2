"""The classic ring algorithms on send/recv, and their alpha-beta-gamma cost model.

The tensor is cut into ``n`` chunks with ``torch.tensor_split`` semantics (any length;
the first ``len % n`` chunks are one element longer). Ranks form a ring, each sending to
its right neighbour ``r + 1`` and receiving from its left ``r - 1``.

- **reduce-scatter**, ``n - 1`` steps: at step ``s`` rank ``r`` sends its partial sum of
  chunk ``r - s - 1`` and adds the chunk ``r - s - 2`` it receives into its own copy.
  After the last step rank ``r`` holds chunk ``r`` reduced over every rank.
- **all-gather**, ``n - 1`` steps: at step ``s`` rank ``r`` sends chunk ``r - s`` (which
  it holds complete) and stores chunk ``r - s - 1``.
- **all-reduce** = reduce-scatter then all-gather.

Each step posts the send (``isend``), then blocks in ``recv``, then waits for the send:
every rank can always make progress, so the ring cannot deadlock on gloo, and nothing
relies on ``batch_isend_irecv``. All traffic goes through the :class:`~loom.distributed.comm.Comm`,
so the ledger counts it (tag ``"ring"``). Empty chunks (length < n) are skipped by both
ends of a transfer, which agree on every chunk's size.

Bytes: rank ``r`` sends every chunk but chunk ``r`` in the reduce-scatter and every chunk
but chunk ``r + 1`` in the all-gather, i.e. ``(n-1)/n * S`` per phase when ``n`` divides the
length (``S`` the message bytes), and the per-rank exact counts sum to ``(n-1) * S`` per
phase over the ring in every case.
"""

from __future__ import annotations

import torch

from loom.distributed.comm import Comm, model_bytes

__all__ = [
    "ring_all_gather",
    "ring_all_gather_time",
    "ring_all_reduce",
    "ring_all_reduce_time",
    "ring_bytes_sent",
    "ring_reduce_scatter",
    "ring_reduce_scatter_time",
]

_TAG = "ring"


def _reducer(op: str):
    if op == "sum":
        return lambda acc, x: acc.add_(x)
    if op == "max":
        return lambda acc, x: torch.maximum(acc, x, out=acc)
    if op == "min":
        return lambda acc, x: torch.minimum(acc, x, out=acc)
    raise ValueError(f"ring op must be 'sum', 'max' or 'min', got {op!r}")


def _step(comm: Comm, send: torch.Tensor, recv: torch.Tensor) -> None:
    """Send ``send`` right and receive ``recv`` from the left, deadlock-free."""
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    handle = comm.isend(send, right, tag=_TAG) if send.numel() else None
    if recv.numel():
        comm.recv(recv, left, tag=_TAG)
    if handle is not None:
        handle.wait()


def _reduce_scatter_chunks(chunks: list[torch.Tensor], comm: Comm, op: str) -> None:
    """In place: afterwards ``chunks[comm.rank]`` is reduced over the ring."""
    n, r = comm.size, comm.rank
    reduce = _reducer(op)
    scratch = torch.empty_like(chunks[0])  # chunk 0 is the longest
    for s in range(n - 1):
        incoming = chunks[(r - s - 2) % n]
        buf = scratch[: incoming.numel()]
        _step(comm, chunks[(r - s - 1) % n], buf)
        reduce(incoming, buf)


def _all_gather_chunks(chunks: list[torch.Tensor], comm: Comm) -> None:
    """In place: ``chunks[comm.rank]`` is complete; afterwards every chunk is."""
    n, r = comm.size, comm.rank
    for s in range(n - 1):
        _step(comm, chunks[(r - s) % n], chunks[(r - s - 1) % n])


def ring_reduce_scatter(tensor: torch.Tensor, comm: Comm, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over the ring and return this rank's chunk (a new 1-D tensor).

    The flattened tensor is cut like ``torch.tensor_split(t.reshape(-1), n)``; rank ``r``
    gets chunk ``r`` reduced with ``op`` (sum, max, min). Rank ``r`` sends ``S - |chunk r|``
    bytes: ``(n-1)/n * S`` when ``n`` divides the length. The input is not modified.
    """
    _reducer(op)
    flat = tensor.detach().reshape(-1).clone()
    if comm.size == 1:
        return flat
    chunks = list(torch.tensor_split(flat, comm.size))
    _reduce_scatter_chunks(chunks, comm, op)
    return chunks[comm.rank].clone()


def ring_all_gather(chunk: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Concatenate every rank's ``chunk`` along dim 0, in group order (all ranks: same shape).

    Rank ``r`` sends ``n - 1`` chunks: ``(n-1)/n * S`` bytes, ``S`` the output's bytes.
    """
    n = comm.size
    shape = (n * chunk.shape[0], *chunk.shape[1:]) if chunk.dim() else (n,)
    out = torch.empty(shape, dtype=chunk.dtype, device=chunk.device)
    chunks = list(out.reshape(-1).chunk(n)) if chunk.numel() else [out.reshape(-1)] * n
    chunks[comm.rank].copy_(chunk.reshape(-1))
    _all_gather_chunks(chunks, comm)
    return out


def ring_all_reduce(tensor: torch.Tensor, comm: Comm, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over the ring; every rank gets the result (a new tensor, same shape).

    Reduce-scatter then all-gather: ``2(n-1)`` steps. Rank ``r`` sends
    ``2S - |chunk r| - |chunk r+1|`` bytes, ``2(n-1)/n * S`` when ``n`` divides the length.
    The input is not modified.
    """
    _reducer(op)
    flat = tensor.detach().reshape(-1).clone()
    if comm.size > 1:
        chunks = list(torch.tensor_split(flat, comm.size))
        _reduce_scatter_chunks(chunks, comm, op)
        _all_gather_chunks(chunks, comm)
    return flat.reshape(tensor.shape)


# ----------------------------------------------------------------------------- cost model


def ring_all_reduce_time(n: int, nbytes: float, alpha: float, beta: float, gamma: float) -> float:
    """Ring all-reduce time: ``2(n-1)·alpha + 2(n-1)/n·S·beta + (n-1)/n·S·gamma``.

    ``alpha`` is the per-message latency (s), ``beta`` the time per byte on a link (s/B),
    ``gamma`` the time per byte reduced (s/B), ``S = nbytes`` the message size.
    """
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes * beta + (n - 1) / n * nbytes * gamma


def ring_reduce_scatter_time(n: int, nbytes: float, alpha: float, beta: float, gamma: float) -> float:
    """Ring reduce-scatter time: ``(n-1)·alpha + (n-1)/n·S·beta + (n-1)/n·S·gamma``, S the input."""
    if n <= 1:
        return 0.0
    return (n - 1) * alpha + (n - 1) / n * nbytes * beta + (n - 1) / n * nbytes * gamma


def ring_all_gather_time(n: int, nbytes: float, alpha: float, beta: float) -> float:
    """Ring all-gather time: ``(n-1)·alpha + (n-1)/n·S·beta``, S the output (nothing is reduced)."""
    if n <= 1:
        return 0.0
    return (n - 1) * alpha + (n - 1) / n * nbytes * beta


def ring_bytes_sent(op: str, n: int, nbytes: int) -> int | float:
    """Bytes each rank sends in the ring ``op`` ("all_reduce", "reduce_scatter", "all_gather").

    ``2(n-1)/n·S`` for all-reduce, ``(n-1)/n·S`` for the others; exact, an ``int`` when whole.
    """
    if op not in ("all_reduce", "reduce_scatter", "all_gather"):
        raise ValueError(f"ring op must be all_reduce, reduce_scatter or all_gather, got {op!r}")
    return model_bytes(op, n, nbytes)
