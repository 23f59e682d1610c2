"""Gradients of a model split over ranks: partial gradients summed over their replicas, and the
global gradient norm, each written once for every update path (``.grad`` or ZeRO's shards).

Both read the parameters' placement records (:mod:`loom.parallel.placement`) and take the
gradients as ``(placement, tensor)`` pairs, so the plain path passes ``param.grad`` and
ZeRO passes the views of its reduced shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from loom.distributed.comm import Comm
from loom.parallel.placement import Placement

PARTIAL_TAG = "tp-partial-grads"


def sum_partial_grads(grads: Iterable[tuple[Placement, torch.Tensor]], comm: Comm, tag: str = PARTIAL_TAG) -> None:
    """Sum every partial gradient (``placement.partial_grad``) over its replica group, in place.

    Per distinct replica count R (sequence-parallel parameters: R = t, the whole tp group;
    a K/V head shared by several ranks: R = t / n_kv_heads) one all-reduce over the tp group
    ``comm`` of a (t / R, n) buffer: row g holds replica group g's gradients (written by its
    R members, zero elsewhere) and each rank reads its own row back. Sent per rank: the
    ring's 2(t-1)/t of (t / R) n elements, n the length of those gradients: the SP sum costs
    n, a shared K/V head the full K/V size. The tp ranks must pass equal layouts (the same
    records in the same order, as every tp rank builds the same modules).
    """
    by_replicas: dict[int, list[torch.Tensor]] = {}
    for placement, grad in grads:
        if placement.partial_grad:
            by_replicas.setdefault(placement.replicas, []).append(grad)
    for replicas, views in sorted(by_replicas.items(), reverse=True):
        n = sum(v.numel() for v in views)
        buffer = torch.zeros(comm.size // replicas, n, dtype=views[0].dtype, device=views[0].device)
        row = buffer[comm.rank // replicas]
        torch.cat([v.reshape(-1) for v in views], out=row)
        comm.all_reduce(buffer, op="sum", tag=tag)
        offset = 0
        for view in views:
            view.copy_(row[offset : offset + view.numel()].view_as(view))
            offset += view.numel()


def clip_grad_norm(
    params: Sequence[tuple[Placement, torch.nn.Parameter]], max_norm: float, comm: Comm, pp: Comm | None = None
) -> float:
    """Clip the parameters' ``.grad`` in place to ``max_norm`` (inf: measure only); returns the global
    norm before clipping.

    norm = sqrt(sum over every parameter of the whole model of ||grad||^2): each rank sums the
    squares of the copies that count (``placement.counted``: a shard, or the owner's replica,
    the first stage's tied copy), one all-reduce over the tp group ``comm`` and one over ``pp``
    add them up, and every rank scales by the same min(1, max_norm / (norm + 1e-6)), as
    ``torch.nn.utils.clip_grad_norm_`` does in one process (which this is, on one rank).
    """
    params = [(placement, p) for placement, p in params if p.grad is not None]
    if comm.size == 1 and (pp is None or pp.size == 1):
        return torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm).item()
    owned = [p.grad for placement, p in params if placement.counted]
    squares = torch.zeros(1, dtype=torch.float32, device=params[0][1].grad.device)
    if owned:
        squares += torch.stack([g.detach().float().pow(2).sum() for g in owned]).sum()
    comm.all_reduce(squares, op="sum", tag="grad-norm")
    if pp is not None:
        pp.all_reduce(squares, op="sum", tag="grad-norm")
    norm = squares.sqrt().item()
    if math.isfinite(max_norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            torch._foreach_mul_([p.grad for _, p in params], coef)
    return norm
