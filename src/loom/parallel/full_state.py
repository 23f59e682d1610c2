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

import torch
from torch import nn

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
    """This rank's state dict cut from a full one."""
    layouts = shard_layouts(model)
    own = model.state_dict()
    return {name: shard_tensor(t, layouts[name], own[name]) if name in layouts else t for name, t in full.items()}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, tp: TensorParallel) -> dict:
    """The optimizer state dict with per-parameter moments at full shape."""
    state = optimizer.state_dict()
    if tp.size == 1:
        return state
    names = _param_names(model, optimizer)
    layouts = shard_layouts(model)
    params = dict(model.named_parameters())
    for index, entry in state["state"].items():
        name = names[index]
        if name in layouts:
            for key, value in entry.items():
                if torch.is_tensor(value) and value.shape == params[name].shape:
                    entry[key] = gather_tensor(value, layouts[name], params[name], tp)
    return state


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a full optimizer state dict, cutting each sharded moment to this rank's slice."""
    names = _param_names(model, optimizer)
    layouts = shard_layouts(model)
    params = dict(model.named_parameters())
    for index, entry in full["state"].items():
        name = names[int(index)]
        if name in layouts:
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    entry[key] = shard_tensor(value, layouts[name], params[name])
    optimizer.load_state_dict(full)
