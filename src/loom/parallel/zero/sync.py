"""ZeRO's gradient sync: gradients land in flat buffers and are reduce-scattered during backward.

A post-accumulate-grad hook adds each gradient into its group's full-size buffer and drops
``param.grad``; when a group is complete its reduce-scatter starts asynchronously, groups
launching in index order on every rank (as DDP's buckets do). At most two are in flight:
launching a third completes the oldest and, at stages 2-3, frees its full-size buffer.
Reduced gradients are kept as *sums* over the ranks (the update divides by N and the fp16
loss scale as it converts them to fp32).

Inside :meth:`ZeroGradients.no_sync` gradients only accumulate in the full-size buffers,
which then outlive the backward (as in FSDP); :meth:`ZeroGradients.finish_gradient_sync`
then reduces them all (a pipeline runs its whole schedule so, then syncs once). Until it
does, :meth:`ZeroGradients.local_grad` is a parameter's local gradient, full size (to
combine copies of one parameter held by other ranks first, such as a pipeline's tied embedding).

=====  ============================================  ===========================
stage  gradients after the sync                      full-size buffer
=====  ============================================  ===========================
1      this rank's slice of the sums (in the buffer)  kept
2, 3   this rank's slice of the sums (own tensor)     freed once sent
=====  ============================================  ===========================

Each collective goes through the counted comm, tagged "zero-grad": (n-1)/n Ψ per step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import nn

from loom.distributed.comm import Comm, Handle
from loom.parallel.ddp import GradientSync
from loom.parallel.zero.gather import UnitGather
from loom.parallel.zero.layout import FlatGroup

MAX_IN_FLIGHT = 2  # gradient collectives outstanding at once


class ZeroGradients(GradientSync):
    """The gradient side of ZeRO ``stage`` (1-3) over ``comm`` for ``groups`` (one rank's layout)."""

    def __init__(
        self,
        groups: Sequence[FlatGroup],
        comm: Comm,
        stage: int,
        dtype: torch.dtype,
        device: torch.device,
        gatherer: UnitGather | None = None,
    ) -> None:
        self.groups, self.comm, self.stage = list(groups), comm, stage
        self.dtype, self.device, self.gatherer = dtype, device, gatherer
        self.sync_enabled = True
        for group in self.groups:
            if stage == 1:
                group.grad_full = self._zeros(group.padded)
                group.grad_shard = group.grad_full[group.lo : group.hi]
            else:
                group.grad_shard = self._zeros(group.hi - group.lo)
        self._slot = {id(p): (g, o) for g in self.groups for p, o in zip(g.params, g.offsets)}
        for group in self.groups:
            for p in group.params:
                p.register_post_accumulate_grad_hook(self._on_grad)
        self._next = 0
        self._in_flight: deque[tuple[FlatGroup, Handle, torch.Tensor]] = deque()
        self._sync_open = False

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=self.dtype, device=self.device)

    def _on_grad(self, param: nn.Parameter) -> None:
        group, offset = self._slot[id(param)]
        grad, param.grad = param.grad, None
        with torch.no_grad():
            if group.grad_full is None:
                group.grad_full = self._zeros(group.padded)
            elif group.reduced:
                self._reopen(group)
            group.grad_full[offset : offset + param.numel()].add_(grad.reshape(-1))
        group.seen += 1
        if group.seen < len(group.params):
            return
        group.seen = 0
        if self.gatherer is not None:
            self.gatherer.release(group.unit)
        self._sync_open = True  # also under no_sync: the next finish_gradient_sync reduces it
        if self.sync_enabled:
            group.pending = True
            self._launch_ready()

    @staticmethod
    def _reopen(group: FlatGroup) -> None:
        """Stage 1 accumulating after a sync: zero the local gradients outside its slice (already
        sent), keeping the sums it owns, so the next reduction adds instead of recounting."""
        group.grad_full[: group.lo].zero_()
        group.grad_full[group.hi :].zero_()
        group.reduced = False

    def _launch_ready(self) -> None:
        while self._next < len(self.groups) and self.groups[self._next].pending:
            self._launch(self.groups[self._next])

    def _launch(self, group: FlatGroup) -> None:
        group.pending, group.reduced = False, self.stage == 1  # stages 2-3 drop the full buffer
        out = torch.empty(group.hi - group.lo, dtype=self.dtype, device=self.device)
        handle = self.comm.reduce_scatter(out, group.grad_full, op="sum", async_op=True, tag="zero-grad")
        self._in_flight.append((group, handle, out))
        self._next += 1
        while len(self._in_flight) > MAX_IN_FLIGHT:
            self._complete(*self._in_flight.popleft())

    def _complete(self, group: FlatGroup, handle: Handle, out: torch.Tensor) -> None:
        handle.wait()
        if self.stage == 1:
            group.grad_shard.copy_(out)  # the owned slice of the input held the earlier sums
        else:
            group.grad_shard.add_(out)
            group.grad_full = None

    def finish_gradient_sync(self) -> None:
        """Launch what is left (groups that got no gradient too) and complete every collective."""
        if self._sync_open:
            for group in self.groups[self._next :]:
                if group.grad_full is None:
                    group.grad_full = self._zeros(group.padded)
                self._launch(group)
            while self._in_flight:
                self._complete(*self._in_flight.popleft())
            self._next, self._sync_open = 0, False
        self.end_backward()

    def keep_local(self) -> None:
        """End a step's backward without reducing anything: the full-size buffers keep this rank's
        gradients (1-bit Adam's compressed phase sends its own message instead)."""
        self._next, self._sync_open = 0, False
        self.end_backward()

    def end_backward(self) -> None:
        """A backward is over (synced or not): forget partial counts, free stage 3's units."""
        for group in self.groups:
            group.seen = 0
        if self.gatherer is not None:
            self.gatherer.release_all()

    def local_grad(self, param: nn.Parameter) -> torch.Tensor:
        """``param``'s local gradient, full size, accumulated under :meth:`no_sync` and not yet
        reduced (a view into its group's buffer: changing it changes what is reduced)."""
        group, offset = self._slot[id(param)]
        if group.grad_full is None:
            group.grad_full = self._zeros(group.padded)
        return group.grad_full[offset : offset + param.numel()].view(param.shape)

    def shard_views(
        self, select: Callable[[nn.Parameter], bool] = lambda p: True
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """After the sync: ``(param, view)`` for the part of each selected parameter's reduced
        gradient this rank owns, in layout order (ranks with equal layouts list equal ranges)."""
        return [(p, g.grad_shard[start:stop]) for g in self.groups for p, start, stop in g.owned_ranges() if select(p)]

    def zero_grad(self) -> None:
        for group in self.groups:
            if self.stage == 1:
                group.grad_full.zero_()
            else:
                group.grad_shard.zero_()
                group.grad_full = None
            group.reduced = False
