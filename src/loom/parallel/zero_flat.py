"""Flat parameter buffers for ZeRO, and stage 3's gather-before-use, free-after.

Layout. Parameters are grouped (stages 0-2: buckets of ``bucket_mb`` in reverse
registration order, roughly backward's; stage 3: one group per unit, plus a root group
holding what no unit owns) and each group flattened into one buffer padded to a multiple
of the N ranks sharing it; rank r owns elements ``[r P/N, (r+1) P/N)`` of the padded size
P. Every parameter becomes a view into its buffer.

Stage 3. A unit is a module (a transformer block) whose parameters exist in full only
while it computes; the root unit is the whole model, so the embeddings, final norm and
(tied) head stay gathered through the model's forward. Per unit and step:

- forward pre-hook: all-gather the unit (or wait for its prefetch), then start the next
  unit's gather asynchronously;
- forward hook: free the unit and hook its outputs' gradient, which fires just before
  the unit's backward;
- that gradient hook: gather the unit again (or wait), prefetch the unit whose backward
  comes next (the previous one);
- once all the unit's gradients have landed, the optimizer calls :meth:`UnitGather.release`.

Two all-gathers and (in the optimizer) one reduce-scatter per parameter and step: 3Ψ.
Freeing resizes the buffer's storage to zero and gathering resizes it back, so the
parameter views into it, and any view autograd saved for backward, stay valid. A unit
gathered for backward ignores forward hooks (activation recomputation runs its forward
again inside backward). Collectives start in the same order on every rank, since every
rank runs the same forward and backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from loom.distributed.comm import Comm, Handle
from loom.optim.adam import FlatAdamW, Segment

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
    unit: Unit | None = None  # stage 3: gather state and the persistent parameter slice
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


def flatten(members: Named, shards: int, rank: int, dtype: torch.dtype) -> tuple[FlatGroup, torch.Tensor]:
    """Copy ``members`` into a new padded buffer of ``dtype`` and make them views into it.

    Returns the group and the values as a full fp32 vector (the master weights' source).
    """
    offsets, total = [], 0
    for _, p in members:
        offsets.append(total)
        total += p.numel()
    padded = -(-total // shards) * shards
    lo = rank * padded // shards
    full32 = torch.zeros(padded, dtype=torch.float32, device=members[0][1].device)
    for (_, p), o in zip(members, offsets):
        full32[o : o + p.numel()] = p.detach().reshape(-1)
    flat = full32.to(dtype)
    with torch.no_grad():
        for (_, p), o in zip(members, offsets):
            p.data = flat[o : o + p.numel()].view_as(p)
    group = FlatGroup(
        [n for n, _ in members], [p for _, p in members], offsets, total, padded, lo, lo + padded // shards, flat
    )
    return group, full32


@dataclass(eq=False)
class Unit:
    """Gather state of one flat group: ``flat`` (full, storage resizable) and its ``shard``."""

    flat: torch.Tensor
    shard: torch.Tensor
    state: str = "ready"  # "free", "gathering" or "ready"
    handle: Handle | None = None
    in_backward: bool = False
    fwd_next: Unit | None = None
    bwd_next: Unit | None = None


class UnitGather:
    """Hooks each ``(module, unit)`` of ``blocks`` (in forward order) and the ``root`` pair
    (the whole model with the parameters no block owns; None when there are none).

    A root pair without a module gets no hooks: the caller brackets each use of the root's
    parameters with :meth:`enter` and :meth:`leave` (a pipeline stage runs the model
    through another method than ``forward``).
    """

    def __init__(
        self, comm: Comm, blocks: Sequence[tuple[nn.Module, Unit]], root: tuple[nn.Module | None, Unit] | None
    ) -> None:
        self.comm = comm
        self.root = root[1] if root is not None else None
        self.held = False
        pairs = ([root] if root is not None else []) + list(blocks)
        self.units = [unit for _, unit in pairs]
        for unit, following in zip(self.units, self.units[1:] + [None]):
            unit.fwd_next = following  # the root's forward encloses the blocks': it comes first
        forward = [unit for _, unit in blocks]
        for unit, earlier in zip(forward, [None, *forward[:-1]]):
            unit.bwd_next = earlier
        if root is not None:  # the root's backward starts first (the head), ends last (embeddings)
            root[1].bwd_next = forward[-1] if forward else None
        for module, unit in pairs:
            if module is None:
                continue
            module.register_forward_pre_hook(lambda m, args, u=unit: self._before_forward(u))
            module.register_forward_hook(lambda m, args, out, u=unit: self._after_forward(u, out))
        for unit in self.units:
            self.free(unit)

    def _before_forward(self, unit: Unit) -> None:
        if unit.in_backward:  # recomputation inside backward: already gathered
            return
        self.gather(unit, wait=True)
        self.gather(unit.fwd_next, wait=False)

    def _after_forward(self, unit: Unit, output) -> None:
        if unit.in_backward or self.held:
            return
        self.free(unit)
        outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if outputs and torch.is_grad_enabled():
            torch.autograd.graph.register_multi_grad_hook(
                outputs, lambda _, u=unit: self._before_backward(u), mode="any"
            )

    def enter(self, unit: Unit) -> None:
        """Before a use of ``unit`` that no forward hook sees: gather it (as a forward pre-hook)."""
        self._before_forward(unit)

    def leave(self, unit: Unit, output) -> None:
        """After that use: free ``unit`` and gather it again when ``output``'s gradient arrives."""
        self._after_forward(unit, output)

    def hold(self) -> None:
        """Gather every unit and keep them all (hooks then free nothing), so the model runs
        alone, as one rank sampling after training does. Every rank of the group calls it;
        later optimizer steps do not reach the held copies."""
        for unit in self.units:
            self.gather(unit, wait=False)
        for unit in self.units:
            self.gather(unit, wait=True)
        self.held = True

    def _before_backward(self, unit: Unit) -> None:
        unit.in_backward = True
        self.gather(unit, wait=True)
        self.gather(unit.bwd_next, wait=False)

    def gather(self, unit: Unit | None, wait: bool) -> None:
        """Start the all-gather of a free unit; with ``wait``, also complete it."""
        if unit is None:
            return
        if unit.state == "free":
            unit.flat.untyped_storage().resize_(unit.flat.numel() * unit.flat.element_size())
            unit.handle = self.comm.all_gather(unit.flat, unit.shard, async_op=True, tag="zero-param")
            unit.state = "gathering"
        if wait and unit.state == "gathering":
            unit.handle.wait()
            unit.handle, unit.state = None, "ready"

    def free(self, unit: Unit) -> None:
        if self.held:
            return
        if unit.state == "gathering":  # never free storage a collective is writing
            unit.handle.wait()
            unit.handle = None
        unit.flat.untyped_storage().resize_(0)
        unit.state = "free"

    def release(self, unit: Unit) -> None:
        """The unit's backward is over (all its gradients landed): free it."""
        unit.in_backward = False
        self.free(unit)

    def release_all(self) -> None:
        for unit in self.units:
            if unit.state != "free":
                self.release(unit)
