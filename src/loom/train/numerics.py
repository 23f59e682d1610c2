"""Non-finite steps: which parameter's gradient went first, agreed by every rank.

A step whose loss or global gradient norm is not finite (both are the same number on every
rank: the norm is summed over dp, tp and pp) is skipped by every rank alike; after
``train.max_bad_steps`` such steps in a row the run stops. Either way the report names the
first parameter whose gradient holds an inf or NaN, in the order (pipeline stage, parameter
order on that stage), found by each rank on the gradients it holds and agreed over the world.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from loom.distributed.comm import Comm
from loom.distributed.objects import broadcast_text

NOT_FOUND = 2**62


def is_bad(loss: float, grad_norm: float) -> bool:
    return not (math.isfinite(loss) and math.isfinite(grad_norm))


def first_non_finite(grads: Iterable[tuple[str, torch.Tensor]], world: Comm, stage: int, device: torch.device) -> str:
    """The name of the first parameter (stage, then order) whose gradient is not finite on any rank;
    "none found" when every gradient is finite (the loss alone was). Collective over ``world``."""
    local, name = NOT_FOUND, ""
    for index, (param_name, grad) in enumerate(grads):
        if grad is not None and grad.numel() and not bool(torch.isfinite(grad).all()):
            local, name = stage * 2**31 + index, param_name
            break
    code = torch.tensor([local], dtype=torch.int64, device=device)
    world.all_reduce(code, op="min", tag="numerics")
    if int(code.item()) == NOT_FOUND:
        return "none found (the loss alone was not finite)"
    owner = torch.tensor([world.rank if local == int(code.item()) else world.size], dtype=torch.int64, device=device)
    world.all_reduce(owner, op="min", tag="numerics")
    return broadcast_text(world, device, name, int(owner.item()), tag="numerics")
