"""ZeRO-3: each unit's parameters exist in full only while it computes (gather before use, free after).

A unit is a module (a transformer block) whose flat group (``layout.py``) is all-gathered
for its forward and again for its backward, and freed in between; the root unit holds
what no block owns (embeddings, final norm, the tied head) and stays gathered through the
forward of the stage that uses it. Per unit and step:

- forward pre-hook: all-gather the unit (or wait for its prefetch), then start the next
  unit's gather asynchronously;
- forward hook: free the unit and hook its outputs' gradient, which fires just before
  the unit's backward;
- that gradient hook: gather the unit again (or wait), prefetch the unit whose backward
  comes next (the previous one);
- once all the unit's gradients have landed, the gradient sync calls :meth:`UnitGather.release`.

Two all-gathers and (in the gradient sync) one reduce-scatter per parameter and step: 3Ψ.
Freeing resizes the buffer's storage to zero and gathering resizes it back, so the
parameter views into it, and any view autograd saved for backward, stay valid; the gather
writes through ``flat.data``, so autograd's version check on those saved views does not
mistake the refill for a change. A unit
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
            # into ``.data``: the same storage under a version counter of its own, so refilling
            # it with the same values does not look, to autograd, like a change to the views
            # saved for backward (the tied head saves the embedding's transpose in forward and
            # uses it after the unit was freed and gathered again)
            unit.handle = self.comm.all_gather(unit.flat.data, unit.shard, async_op=True, tag="zero-param")
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
