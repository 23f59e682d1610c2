"""Full (layout-free) tensors from tensor-parallel shards, and back.

Checkpoints hold every parameter (and its optimizer moments) at its full, unpadded
shape, so a checkpoint written at tp = 4 loads at tp = 1 or 2. Each parameter's placement
record (:mod:`loom.parallel.placement`) says which part of the full tensor this rank holds.

Gathering: every rank writes the part it owns into a zero tensor of the full shape and
one all-reduce (sum) over tp assembles it (replicas of a K/V head are written by their
owner only). Sharding: each rank cuts its part out of the full tensor and pads.
"""

from __future__ import annotations

import io

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


def local_tensors(
    placements: Placements, full: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """This rank's part of each parameter that ``full`` names (the inverse of :func:`full_tensors`;
    a pipeline stage takes only its own names), in ``dtype`` (default: the parameter's)."""
    out = {}
    for name, param, placement in placements.named():
        if name in full:
            like = torch.empty(param.shape, dtype=dtype or param.dtype)
            out[name] = placement.cut(full[name], like)
    return out


def full_model_state(model: nn.Module, placements: Placements, comm: Comm) -> dict[str, torch.Tensor]:
    """The model's state dict with every split tensor at its full shape (on every rank of tp ``comm``)."""
    return full_tensors(placements, model.state_dict(), comm)


def local_model_state(placements: Placements, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's state dict cut from a full one (a pipeline stage takes only its names)."""
    return local_tensors(placements, full)


def _param_names(placements: Placements, optimizer: torch.optim.Optimizer) -> list[str]:
    return [placements.name_of(p) for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(placements: Placements, optimizer: torch.optim.Optimizer, comm: Comm) -> dict:
    """The optimizer state keyed by parameter name, per-parameter moments at full shape.

    Names, not positions, so a checkpoint loads into any layout: another tp size, or a
    pipeline stage that holds only some of the parameters.
    """
    local = optimizer.state_dict()
    names = _param_names(placements, optimizer)
    state = {}
    for index, entry in local["state"].items():
        name = names[index]
        placement, shape = placements[name], placements.param(name).shape
        if comm.size > 1 and placement.tp_dim is not None:
            entry = {
                key: gather_tensor(value, placement, comm) if torch.is_tensor(value) and value.shape == shape else value
                for key, value in entry.items()
            }
        state[name] = entry
    groups = [{k: v for k, v in group.items() if k != "params"} for group in local["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(placements: Placements, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a name-keyed full optimizer state, cutting each split moment to this rank's part."""
    names = _param_names(placements, optimizer)
    state = {}
    for index, name in enumerate(names):
        if name not in full["state"]:
            continue
        placement, param = placements[name], placements.param(name)
        state[index] = {
            key: placement.cut(value, param)
            if placement.tp_dim is not None and torch.is_tensor(value) and value.dim()
            else value
            for key, value in full["state"][name].items()
        }
    local_groups = optimizer.state_dict()["param_groups"]
    # this optimizer's own settings (e.g. fused) where the saved groups name fewer (ZeRO's checkpoints)
    groups = [
        {**mine, **saved, "params": mine["params"]}
        for saved, mine in zip(full["param_groups"], local_groups, strict=True)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def merge_pipeline_states(states: dict, comm: Comm) -> dict | None:
    """Collect every pipeline stage's name-keyed dicts on pp rank 0 (others get None).

    ``states`` maps a part ("model", "optimizer") to a dict keyed by parameter name (the
    optimizer's under "state"). Stages send theirs as one serialised message each;
    names already present (the tied embedding's copy on the last stage) keep the
    first stage's value.
    """
    if comm.size == 1:
        return states
    if comm.rank != 0:
        payload = _to_bytes(states)
        comm.send(torch.tensor([payload.numel()], dtype=torch.int64), 0, tag="checkpoint")
        comm.send(payload, 0, tag="checkpoint")
        return None
    merged = states
    for peer in range(1, comm.size):
        size = torch.zeros(1, dtype=torch.int64)
        comm.recv(size, peer, tag="checkpoint")
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        comm.recv(payload, peer, tag="checkpoint")
        other = torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)
        for name, value in other["model"].items():
            merged["model"].setdefault(name, value)
        for name, value in other["optimizer"]["state"].items():
            merged["optimizer"]["state"].setdefault(name, value)
    return merged


def _to_bytes(obj: dict) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
