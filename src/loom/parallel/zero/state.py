"""ZeRO's states seen from outside: the bytes each rank holds, and checkpoints in any layout.

- :func:`memory`: model-state bytes this rank holds now (live tensors), by category, and
  what the padding adds, so ``params + grads + optim == formula(Ψ) + padding_bytes``
  exactly (``loom.plan.memory``'s formula, K = 12, or 8 where fp32 parameters are their own
  master weights).
- :func:`full_state` / :func:`load_full_state`: name-keyed full fp32 parameters and AdamW
  state in torch's layout, so a checkpoint of any dp size or stage loads into any other
  (and the plain path's checkpoints into ZeRO's, and back).
- :func:`state_dict` / :func:`load_state_dict`: this rank's slices as they are, for the
  same layout only.
- :func:`pieces` / :func:`load_pieces`: the boxes of the global tensors this rank's slices
  cover, for sharded checkpoints (``loom.parallel.pieces``): written without gathering,
  read back under any layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from loom.distributed.comm import Comm
from loom.optim.scaler import DynamicLossScaler
from loom.parallel.pieces import (
    MOMENTS,
    Piece,
    Reader,
    check_shape,
    flat_boxes,
    model_key,
    optim_key,
    real_shape,
    to_global,
)
from loom.parallel.placement import Placement, Placements
from loom.parallel.zero.layout import FlatGroup

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def memory(groups: Sequence[FlatGroup], stage: int, n: int, optim_device: torch.device) -> dict:
    """Bytes of model states this rank holds (see the module docstring); ``n`` ranks share them."""
    params = grads = optim = 0
    padding = Fraction(0)
    k = groups[0].optim.bytes_per_element
    per_elem = (groups[0].flat.element_size(), groups[0].grad_shard.element_size(), k)
    for g in groups:
        params += g.flat.untyped_storage().nbytes()
        if g.unit is not None:
            params += g.unit.shard.numel() * g.unit.shard.element_size()
        if g.grad_full is not None:
            grads += g.grad_full.numel() * g.grad_full.element_size()
        if stage >= 2:
            grads += g.grad_shard.numel() * g.grad_shard.element_size()
        optim += g.optim.nbytes
        pad = g.padded - g.numel
        for first_sharded, size in zip((3, 2, 1), per_elem):
            padding += Fraction(pad * size, n if stage >= first_sharded else 1)
    return {
        "mem_params_bytes": params,
        "mem_grads_bytes": grads,
        "mem_optim_bytes": optim,
        "padding_bytes": int(padding) if padding.denominator == 1 else float(padding),
        "padding_elements": sum(g.padded - g.numel for g in groups),
        "params_dtype": DTYPE_NAMES[groups[0].flat.dtype],
        "grads_dtype": DTYPE_NAMES[groups[0].grad_shard.dtype],
        "optim_bytes_per_element": k,
        "optim_device": str(optim_device),
    }


def _gather_full(group: FlatGroup, shard: torch.Tensor, comm: Comm) -> torch.Tensor:
    """This group's full vector from every rank's slice ``shard`` (on the CPU)."""
    if comm.size == 1:
        return shard.detach().to("cpu", copy=True)
    device = group.flat.device
    full = torch.empty(group.padded, dtype=shard.dtype, device=device)
    comm.all_gather(full, shard.to(device), tag="zero-full")
    return full.cpu()


def _by_name(group: FlatGroup, full: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        n: full[o : o + p.numel()].view(p.shape).clone() for n, p, o in zip(group.names, group.params, group.offsets)
    }


def full_parameters(groups: Sequence[FlatGroup], comm: Comm) -> dict[str, torch.Tensor]:
    """Every parameter at full size in fp32 (the master weights), on every rank."""
    out = {}
    for group in groups:
        out.update(_by_name(group, _gather_full(group, group.optim.master, comm)))
    return out


def full_state(groups: Sequence[FlatGroup], comm: Comm, scaler: DynamicLossScaler | None) -> dict:
    """Name-keyed full fp32 parameters and AdamW state (torch's layout), on every rank."""
    state = {}
    for group in groups:
        exp_avg, exp_avg_sq = (
            _by_name(group, _gather_full(group, t, comm)) for t in (group.optim.exp_avg, group.optim.exp_avg_sq)
        )
        step = torch.tensor(float(group.optim.step_count))
        for name in group.names:
            state[name] = {"step": step.clone(), "exp_avg": exp_avg[name], "exp_avg_sq": exp_avg_sq[name]}
    return {
        "model": full_parameters(groups, comm),
        "optimizer": {"state": state},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


@torch.no_grad()
def load_full_state(groups: Sequence[FlatGroup], full: dict) -> None:
    """Cut this rank's master and moment slices from :func:`full_state`'s layout (any dp size or
    stage); the caller then publishes them to the parameters."""
    for group in groups:
        pieces = {"master": [full["model"][n] for n in group.names]}
        entries = [full["optimizer"]["state"].get(n) for n in group.names]
        if all(e is not None for e in entries):
            pieces["exp_avg"] = [e["exp_avg"] for e in entries]
            pieces["exp_avg_sq"] = [e["exp_avg_sq"] for e in entries]
            group.optim.step_count = int(entries[0]["step"])
        for key, tensors in pieces.items():
            flat = torch.zeros(group.padded, dtype=torch.float32)
            flat[: group.numel] = torch.cat([t.reshape(-1).float().cpu() for t in tensors])
            getattr(group.optim, key).copy_(flat[group.lo : group.hi])


def _layout(groups: Sequence[FlatGroup], stage: int, comm: Comm) -> dict:
    return {"stage": stage, "world": comm.size, "layout": [(g.names, g.padded) for g in groups]}


def state_dict(groups: Sequence[FlatGroup], stage: int, comm: Comm, scaler: DynamicLossScaler | None) -> dict:
    """This rank's slices (loads back only into the same layout: stage, N, buckets)."""
    return {
        **_layout(groups, stage, comm),
        "groups": [g.optim.state_dict() for g in groups],
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


@torch.no_grad()
def load_state_dict(
    groups: Sequence[FlatGroup], stage: int, comm: Comm, scaler: DynamicLossScaler | None, state: dict
) -> None:
    """The inverse of :func:`state_dict` (the caller then publishes); another layout is a ValueError."""
    mine = _layout(groups, stage, comm)
    for key in mine:
        if state[key] != mine[key]:
            raise ValueError(
                f"ZeRO state {key} differs: saved {state[key]!r}, this run {mine[key]!r}; "
                "use full_state()/load_full_state() to change the layout"
            )
    for group, saved in zip(groups, state["groups"]):
        group.optim.load_state_dict(saved)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


# ----------------------------------------------------------------------------- sharded checkpoints


def _owned_boxes(group: FlatGroup, placements: Placements) -> list[tuple[str, Placement, tuple, tuple, slice]]:
    """Every box of a parameter's global tensor this rank's owned slice covers: (name, placement,
    global offsets, sizes, the box's positions in the owned slice); padding rows and buffer
    padding are left out."""
    out = []
    for name, offset in zip(group.names, group.offsets):
        place = placements[name]
        real = math.prod(real_shape(place))
        start, stop = max(offset, group.lo), min(offset + real, group.hi)  # positions in the buffer
        at = start - group.lo
        for offsets, sizes in flat_boxes(real_shape(place), start - offset, stop - offset):
            n = math.prod(sizes)
            out.append((name, place, to_global(place, offsets), sizes, slice(at, at + n)))
            at += n
    return out


def _key(name: str, what: str) -> str:
    return model_key(name) if what == "model" else optim_key(name, what)


def pieces(groups: Sequence[FlatGroup], placements: Placements) -> list[Piece]:
    """What this rank writes under ZeRO: the boxes its owned slices cover of every parameter's
    fp32 master weights and AdamW moments (views, no copies), each written once: a tp
    replica by its owner, a tied copy by the first stage."""
    out = []
    for group in groups:
        opt = group.optim
        sources = {"model": opt.master, "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}
        for name, place, where, sizes, span in _owned_boxes(group, placements):
            if not place.counted:
                continue
            out += [
                Piece(_key(name, what), place.full_shape, where, flat[span].view(sizes))
                for what, flat in sources.items()
            ]
            if not any(where):
                out.append(Piece(optim_key(name, "step"), (), (), torch.tensor(float(opt.step_count))))
    return out


@torch.no_grad()
def load_pieces(groups: Sequence[FlatGroup], placements: Placements, reader: Reader) -> None:
    """Fill this rank's master and moment slices with the boxes it owns, from a checkpoint of any
    layout (the caller then publishes). Moments the checkpoint lacks (saved before the first
    update) start at zero with the step count 0, as a fresh optimizer."""
    for group in groups:
        for name in group.names:
            check_shape(reader, name, placements[name])
    for group in groups:
        opt = group.optim
        has_moments = all(reader.shape(optim_key(name, MOMENTS[0])) is not None for name in group.names)
        targets = {"model": opt.master}
        if has_moments:
            targets |= {"exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}
            opt.step_count = int(reader.read(optim_key(group.names[0], "step"), (), (), torch.float32))
        else:
            opt.exp_avg.zero_()
            opt.exp_avg_sq.zero_()
            opt.step_count = 0
        for flat in targets.values():
            flat.zero_()  # padding stays zero
        for name, _, where, sizes, span in _owned_boxes(group, placements):
            for what, flat in targets.items():
                flat[span].copy_(reader.read(_key(name, what), where, sizes, torch.float32).reshape(-1))
