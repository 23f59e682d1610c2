"""ZeRO's flat layout: parameters grouped into padded flat buffers, each rank owning an equal slice.

Parameters are grouped (stages 1-2: buckets of ``bucket_mb`` in reverse registration order,
roughly backward's; stage 3: one group per unit, plus a root group holding what no unit
owns) and each group is flattened into one buffer padded to a multiple of the N ranks
sharing it; rank r owns elements ``[r P/N, (r+1) P/N)`` of the padded size P. Every
parameter becomes a view into its buffer, so each collective is one large message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loom.optim.adam import FlatAdamW, Segment
from loom.parallel.zero.gather import Unit

Named = list[tuple[str, nn.Parameter]]


def bucket_layout(named: Named, cap_bytes: int, itemsize: int) -> list[Named]:
    """Stages 0-2: reverse registration order, a new bucket every ``cap_bytes``."""
    layout: list[Named] = [[]]
    size = 0
    for name, p in reversed(named):
        if layout[-1] and size + p.numel() * itemsize > cap_bytes:
            layout.append([])
            size = 0
        layout[-1].append((name, p))
        size += p.numel() * itemsize
    return layout


def unit_layout(named: Named, units: Sequence[nn.Module]) -> list[Named]:
    """Stage 3: one group per unit in backward order, then the root (everything else)."""
    owned: set[int] = set()
    per_unit = []
    for unit in units:
        ids = {id(p) for p in unit.parameters()}
        per_unit.append([(n, p) for n, p in named if id(p) in ids and id(p) not in owned])
        owned |= ids
    root = [(n, p) for n, p in named if id(p) not in owned]  # none in a pipeline's middle stage
    return [m for m in reversed(per_unit) if m] + ([root] if root else [])


@dataclass(eq=False)
class FlatGroup:
    """Parameters sharing one padded flat buffer; this rank owns elements ``[lo, hi)``."""

    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    padded: int
    lo: int
    hi: int
    flat: torch.Tensor  # compute parameters, full size (storage freed while stage 3 is not gathered)
    optim: FlatAdamW | None = None
    unit: Unit | None = None  # stage 3: gather state and the persistent parameter slice (gather.py)
    grad_full: torch.Tensor | None = None  # local gradients, full size
    grad_shard: torch.Tensor | None = None  # reduced gradient sums of [lo, hi)
    seen: int = 0  # gradients landed in this backward
    pending: bool = False  # complete and waiting for its turn to launch
    reduced: bool = False  # stages 0-1: the buffer holds reduced sums since the last zero_grad

    def owned_ranges(self) -> list[tuple[nn.Parameter, int, int]]:
        """``(param, start, stop)``: the part of each parameter inside the owned slice,
        as positions in that slice (parameters outside it are left out)."""
        ranges = []
        for p, o in zip(self.params, self.offsets):
            start, stop = max(o, self.lo), min(o + p.numel(), self.hi)
            if start < stop:
                ranges.append((p, start - self.lo, stop - self.lo))
        return ranges

    def decay_segments(self, weight_decay: float) -> list[Segment]:
        """The ranges of the owned slice that hold matrices (dim >= 2), which decay."""
        segments = []
        for p, o in zip(self.params, self.offsets):
            start, stop = max(o, self.lo), min(o + p.numel(), self.hi)
            if p.dim() >= 2 and weight_decay and start < stop:
                segments.append((start - self.lo, stop - self.lo, weight_decay))
        return segments


def flatten(
    members: Named,
    shards: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    initial: Callable[[str], torch.Tensor] | None = None,
) -> tuple[FlatGroup, torch.Tensor]:
    """Copy ``members`` into a new padded buffer of ``dtype`` on ``device`` and make them views into it.

    A parameter on the meta device (a model built without memory) gets ``initial(name)``, its
    initial value, instead of its own, and is replaced in the group by a new parameter viewing
    the buffer (:func:`swap_parameters` puts it into the model): only this group's values
    exist at once. Returns the group and the values as a full fp32 vector (the master
    weights' source).
    """
    offsets, total = [], 0
    for _, p in members:
        offsets.append(total)
        total += p.numel()
    padded = -(-total // shards) * shards
    lo = rank * padded // shards
    full32 = torch.zeros(padded, dtype=torch.float32, device=device)
    for (name, p), o in zip(members, offsets):
        value = initial(name) if p.is_meta else p.detach()
        full32[o : o + p.numel()] = value.reshape(-1)
    flat = full32.to(dtype)
    params = []
    with torch.no_grad():
        for (_, p), o in zip(members, offsets):
            view = flat[o : o + p.numel()].view(p.shape)
            if p.is_meta:  # a meta tensor cannot take real storage through .data: a new parameter
                params.append(nn.Parameter(view, requires_grad=p.requires_grad))
            else:
                p.data = view
                params.append(p)
    group = FlatGroup([n for n, _ in members], params, offsets, total, padded, lo, lo + padded // shards, flat)
    return group, full32


def swap_parameters(model: nn.Module, new: dict[int, nn.Parameter]) -> None:
    """Put each parameter of ``new`` (keyed by the ``id`` of the one it replaces) into every
    module that holds the old one (a tied parameter is held twice)."""
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                module._parameters[key] = new[id(param)]
