"""Gradient clipping by the global L2 norm of a model split across ranks.

norm = sqrt(sum over every parameter of the *whole* model of ||grad||^2). Under tensor
parallelism each rank holds a shard of some parameters and a replica of others, so each
rank sums the squares of what it owns (its shards; replicated parameters only on their
owner, tp rank 0 by default or ``param.tp_owner``) and one all-reduce over the group adds
them up. Every rank then scales by the same min(1, max_norm / (norm + 1e-6)), as
``torch.nn.utils.clip_grad_norm_`` does in one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from loom.distributed.comm import Comm


def owns(param: torch.Tensor, comm: Comm) -> bool:
    """Whether this tp rank holds the copy of ``param`` that counts (its shard, or rank 0's replica)."""
    if hasattr(param, "tp_owner"):
        return param.tp_owner
    return getattr(param, "tp_sharded", False) or comm.rank == 0


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, comm: Comm, pp: Comm | None = None) -> float:
    """Clip in place to ``max_norm`` (inf: measure only); returns the global norm before clipping.

    ``comm`` is the tp group; ``pp`` the pipeline group, whose stages hold disjoint layers.
    """
    params = [p for p in params if p.grad is not None]
    if comm.size == 1 and (pp is None or pp.size == 1):
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    # the tied embedding's copy on the last pipeline stage is counted on the first stage only
    owned = [p.grad for p in params if owns(p, comm) and not getattr(p, "pp_duplicate", False)]
    device = params[0].grad.device
    squares = torch.zeros(1, dtype=torch.float32, device=device)
    if owned:
        squares += torch.stack([g.detach().float().pow(2).sum() for g in owned]).sum()
    comm.all_reduce(squares, op="sum", tag="grad-norm")
    if pp is not None:
        pp.all_reduce(squares, op="sum", tag="grad-norm")
    norm = squares.sqrt().item()
    if math.isfinite(max_norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in params], coef)
    return norm
