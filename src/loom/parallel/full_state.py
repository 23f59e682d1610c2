"""Full (layout-free) tensors from tensor-parallel shards, and back.

Checkpoints hold every parameter (and its optimizer moments) at its full, unpadded
shape, so a checkpoint written at tp = 4 loads at tp = 1 or 2. Each sharded parameter's
module declares ``shards[name] = (full_shape, rows, cols)``: this rank's slice of the
full tensor (rows past the real vocabulary are padding and are dropped).

Gathering: every rank writes the slice it owns into a zero tensor of the full shape and
one all-reduce (sum) over tp assembles it (replicas of a K/V head are written by their
owner only). Sharding: each rank cuts its slice out of the full tensor and pads.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from loom.distributed.comm import Comm
from loom.optim.clip import owns
from loom.parallel.tensor import TensorParallel

Layout = tuple[tuple[int, ...], slice, slice]


def shard_layouts(model: nn.Module) -> dict[str, Layout]:
    """Parameter name -> (full_shape, rows, cols) for every sharded parameter."""
    layouts = {}
    for module_name, module in model.named_modules():
        for name, layout in getattr(module, "shards", {}).items():
            layouts[f"{module_name}.{name}" if module_name else name] = layout
    return layouts


def _real_rows(layout: Layout) -> slice:
    """The rows of the full tensor this shard holds, padding excluded."""
    full_shape, rows, _ = layout
    start, stop, _ = rows.indices(full_shape[0])
    return slice(start, max(start, stop))


def gather_tensor(local: torch.Tensor, layout: Layout, param: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    full_shape, rows, cols = layout
    full = torch.zeros(full_shape, dtype=local.dtype, device=local.device)
    if owns(param, tp.comm):
        real = _real_rows(layout)
        full[real][..., cols] = local[: real.stop - real.start]
    tp.comm.all_reduce(full, op="sum", tag="checkpoint")
    return full


def shard_tensor(full: torch.Tensor, layout: Layout, like: torch.Tensor) -> torch.Tensor:
    cols = layout[2]
    real = _real_rows(layout)
    local = torch.zeros_like(like)
    local[: real.stop - real.start] = full[real][..., cols].to(like.dtype)
    return local


def full_model_state(model: nn.Module, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor at its full shape (on every rank)."""
    state = model.state_dict()
    if tp.size == 1:
        return state
    params = dict(model.named_parameters())
    for name, layout in shard_layouts(model).items():
        state[name] = gather_tensor(state[name], layout, params[name], tp)
    return state


def local_model_state(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's state dict cut from a full one (a pipeline stage takes only its names)."""
    layouts = shard_layouts(model)
    own = model.state_dict()
    return {
        name: shard_tensor(full[name], layouts[name], own[name]) if name in layouts else full[name]
        for name in own
        if name in full
    }


def full_tensors(model: nn.Module, local: dict[str, torch.Tensor], tp: TensorParallel) -> dict[str, torch.Tensor]:
    """Per-parameter tensors of this rank (``local``: name -> tensor of the parameter's local
    shape, e.g. ZeRO's fp32 master weights or moments) at full shape, on every rank."""
    if tp.size == 1:
        return dict(local)
    layouts, params = shard_layouts(model), dict(model.named_parameters())
    return {
        name: gather_tensor(value.to(params[name].device), layouts[name], params[name], tp)
        if name in layouts
        else value
        for name, value in local.items()
    }


def local_tensors(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's slice, in fp32, of each of ``model``'s parameters that ``full`` names
    (the inverse of :func:`full_tensors`; a pipeline stage takes only its own names)."""
    layouts = shard_layouts(model)
    out = {}
    for name, param in model.named_parameters():
        if name in full:
            value = full[name].float()
            like = torch.empty(param.shape, dtype=torch.float32)
            out[name] = shard_tensor(value, layouts[name], like) if name in layouts else value
    return out


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, tp: TensorParallel) -> dict:
    """The optimizer state keyed by parameter name, per-parameter moments at full shape.

    Names, not positions, so a checkpoint loads into any layout: another tp size, or a
    pipeline stage that holds only some of the parameters.
    """
    local = optimizer.state_dict()
    names = _param_names(model, optimizer)
    layouts = shard_layouts(model) if tp.size > 1 else {}
    params = dict(model.named_parameters())
    state = {}
    for index, entry in local["state"].items():
        name = names[index]
        if name in layouts:
            entry = {
                key: gather_tensor(value, layouts[name], params[name], tp)
                if torch.is_tensor(value) and value.shape == params[name].shape
                else value
                for key, value in entry.items()
            }
        state[name] = entry
    groups = [{k: v for k, v in group.items() if k != "params"} for group in local["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a name-keyed full optimizer state, cutting each sharded moment to this rank's slice."""
    names = _param_names(model, optimizer)
    layouts = shard_layouts(model)
    params = dict(model.named_parameters())
    state = {}
    for index, name in enumerate(names):
        if name not in full["state"]:
            continue
        entry = dict(full["state"][name])
        if name in layouts:
            entry = {
                key: shard_tensor(value, layouts[name], params[name])
                if torch.is_tensor(value) and value.dim() > 0
                else value
                for key, value in entry.items()
            }
        state[index] = entry
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
