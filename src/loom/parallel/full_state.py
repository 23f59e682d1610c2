"""A tensor-parallel model's full (layout-free) tensors, assembled in memory over the tp group.

Each parameter's placement record (:mod:`loom.parallel.placement`) says which part of the
full tensor this rank holds. Gathering: every rank writes the part it owns into a zero
tensor of the full shape and one all-reduce (sum) over tp assembles it (replicas of a K/V
head are written by their owner only). For tools and tests that want one rank to see the
whole model; checkpoints never gather (``loom.parallel.pieces``: each rank writes its part).
"""

from __future__ import annotations

import torch
from torch import nn

from loom.distributed.comm import Comm
from loom.parallel.placement import Placement, Placements


def gather_tensor(local: torch.Tensor, placement: Placement, comm: Comm) -> torch.Tensor:
    """The full tensor on every rank of the tp group ``comm`` from each rank's ``local`` part."""
    full = torch.zeros(placement.full_shape, dtype=local.dtype, device=local.device)
    if placement.owner:
        placement.index(full).copy_(placement.real(local))
    comm.all_reduce(full, op="sum", tag="checkpoint")
    return full


def full_tensors(placements: Placements, local: dict[str, torch.Tensor], comm: Comm) -> dict[str, torch.Tensor]:
    """Per-parameter tensors of this rank (``local``: name -> tensor of the parameter's local
    shape: the model's state dict, ZeRO's fp32 master weights or moments) at full shape, on
    every rank of the tp group ``comm``. Unsplit ones are returned as they are."""
    if comm.size == 1:
        return dict(local)
    return {
        name: gather_tensor(value.to(placements.param(name).device), placements[name], comm)
        if name in placements and placements[name].tp_dim is not None
        else value
        for name, value in local.items()
    }


def full_model_state(model: nn.Module, placements: Placements, comm: Comm) -> dict[str, torch.Tensor]:
    """The model's state dict with every split tensor at its full shape (on every rank of tp ``comm``)."""
    return full_tensors(placements, model.state_dict(), comm)
