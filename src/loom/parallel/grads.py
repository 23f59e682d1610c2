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


def tensor_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each tensor in fp32, in one foreach pass (as ``clip_grad_norm_`` takes them)."""
    if not tensors:
        return []
    if all(t.dtype == torch.float32 for t in tensors):
        return list(torch._foreach_norm(list(tensors)))
    return list(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))


def global_norm(
    norms: Sequence[torch.Tensor], comms: Sequence[Comm], device: torch.device, carry: torch.Tensor | None = None
) -> torch.Tensor:
    """The norm of the whole model's gradient from each rank's per-tensor ``norms``.

    Locally ``vector_norm(stack(norms))``, the formula of ``torch.nn.utils.clip_grad_norm_``
    (bit for bit when no group of ``comms`` has more than one rank); across ranks the squares
    of the local norms are summed, one all-reduce per group of ``comms``: norm = sqrt(sum over
    ranks of ||local||^2). Each rank passes the norms of the copies that count
    (``placement.counted``), so every parameter of the model counts once.

    ``carry``: a one-element tensor (the step's loss, for the log) summed over the same groups
    in the same messages, in place: it costs no collective of its own.
    """
    local = torch.linalg.vector_norm(torch.stack(list(norms))) if norms else torch.zeros((), device=device)
    groups = [comm for comm in comms if comm.size > 1]
    if not groups:
        return local
    squares = local.square().reshape(1)
    if carry is not None:
        squares = torch.cat([squares, carry.detach().reshape(1).to(squares.dtype)])
    for comm in groups:
        comm.all_reduce(squares, op="sum", tag="grad-norm")
    if carry is not None:
        carry.copy_(squares[1].reshape(carry.shape))
    return squares[0].sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)): what ``clip_grad_norm_`` multiplies the gradients by."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def clip_grad_norm(
    grads: Sequence[tuple[Placement, torch.Tensor]],
    max_norm: float,
    comms: Sequence[Comm],
    carry: torch.Tensor | None = None,
    replicas: Comm | None = None,
) -> float:
    """Clip ``grads`` in place to the global norm ``max_norm`` (inf: measure only); the norm before.

    The norm is :func:`global_norm` over the copies that count, summed over ``comms`` (the tp
    and pp groups); every rank scales all its gradients by the same :func:`clip_coefficient`.
    In one process this is ``torch.nn.utils.clip_grad_norm_``, bit for bit. ``carry`` rides
    along (:func:`global_norm`); ``replicas`` is a group whose ranks hold equal gradients (dp
    after DDP's sync) that ``carry`` must be summed over too: its rank 0 alone contributes the
    squares, so the norm comes out the same.
    """
    tensors = [g for _, g in grads]
    device = tensors[0].device if tensors else torch.device("cpu")
    counted = [g for place, g in grads if place.counted]
    if carry is not None and replicas is not None and replicas.size > 1:
        comms = [replicas, *comms]
        counted = counted if replicas.rank == 0 else []
    norm = global_norm(tensor_norms(counted), comms, device, carry)
    if math.isfinite(max_norm):
        coef = clip_coefficient(norm, max_norm)
        if coef.item() < 1.0:  # (times 1.0 would change nothing)
            torch._foreach_mul_(tensors, coef)
    return norm.item()
