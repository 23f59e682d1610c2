"""Data parallelism: bucketed gradient all-reduce, overlapped with backward.

Buckets hold parameters in reverse registration order (roughly the order backward
produces their gradients), each closed once it holds ``bucket_mb`` megabytes (so small
biases and norms ride with the matrix before them instead of travelling alone). Each bucket owns one flat
buffer and after a step's first backward every parameter's ``.grad`` is a view into it,
so later micro-batches accumulate in place and a bucket is one message with no copies.

A post-accumulate-grad hook moves each gradient into its slot. :meth:`zero_grad` only
drops ``.grad`` (nothing is written), so the first gradient of a step arrives as a fresh
tensor and is copied into the slot -- divided by n on the way when it is the one to be
sent, so the mean costs no extra pass over the buffer (as torch's reducer does); an
accumulated slot is divided in place. When a bucket's last gradient lands its
all-reduce (sum) starts asynchronously while backward carries on with earlier layers.
Buckets are launched in index order on every rank (a ready bucket waits for its
predecessors), so the collectives match across ranks whatever order the hooks fire in.

Invariant: after :meth:`finish_gradient_sync` each rank's gradients equal the mean of the
dp ranks' local gradients; per step every rank sends 2(n-1)/n * (parameter bytes) (ring).
Inside :meth:`no_sync` (gradient accumulation) nothing is sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from loom.dist.comm import Comm


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor
    ready: int = 0
    handle: object | None = None
    offsets: list[int] = field(default_factory=list)
    divided: list[bool] = field(default_factory=list)  # slot i already holds its share (grad / n)

    def slot(self, i: int) -> torch.Tensor:
        return self.buffer[self.offsets[i] : self.offsets[i] + self.params[i].numel()]


class DataParallel:
    """Wraps ``model``'s gradients (not its forward): call backward as usual, then sync."""

    def __init__(self, model: nn.Module, comm: Comm, bucket_mb: float = 25.0) -> None:
        self.model = model
        self.comm = comm
        self.sync_enabled = True
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = self._make_buckets(list(reversed(params)), int(bucket_mb * 2**20))
        self._next_launch = 0
        self._slot_of = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], cap_bytes: int) -> list[Bucket]:
        groups: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in params:
            if groups[-1] and p.dtype != groups[-1][0].dtype:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.numel() * p.element_size()
            if size >= cap_bytes:  # close a bucket once full (as torch's reducer does), not before
                groups.append([])
                size = 0
        buckets = []
        for group in (g for g in groups if g):
            buffer = torch.zeros(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            bucket = Bucket(group, buffer, divided=[False] * len(group))
            offset = 0
            for p in group:
                bucket.offsets.append(offset)
                offset += p.numel()
            buckets.append(bucket)
        for bucket in buckets:
            for i, p in enumerate(bucket.params):
                if p.grad is not None:  # gradients already there are kept (as the slot's content)
                    bucket.slot(i).copy_(p.grad.reshape(-1))
                p.grad = bucket.slot(i).view_as(p)
        return buckets

    @property
    def parameter_bytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (earlier micro-batches of a step): nothing is sent."""
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    @torch.no_grad()
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket, i = self._slot_of[id(param)]
        slot = bucket.slot(i)
        fresh = param.grad.data_ptr() != slot.data_ptr()  # first gradient of the step (or replaced)
        if not self.sync_enabled:
            if fresh:
                slot.copy_(param.grad.reshape(-1))
                param.grad = slot.view_as(param)
            return
        if fresh:
            torch.div(param.grad.reshape(-1), self.comm.size, out=slot)
            param.grad = slot.view_as(param)
        else:
            slot.div_(self.comm.size)
        bucket.divided[i] = True
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.ready < len(bucket.params):
                return
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        bucket.handle = self.comm.all_reduce(bucket.buffer, op="sum", async_op=True, tag="grad")
        self._next_launch += 1

    @torch.no_grad()
    def _complete_shares(self, bucket: Bucket) -> None:
        """Before a late launch: slots no sync-time hook divided get their share (zero if no gradient)."""
        for i, p in enumerate(bucket.params):
            if bucket.divided[i]:
                continue
            slot = bucket.slot(i)
            if p.grad is None:
                slot.zero_()
            else:
                if p.grad.data_ptr() != slot.data_ptr():
                    slot.copy_(p.grad.reshape(-1))
                slot.div_(self.comm.size)
            p.grad = slot.view_as(p)

    def finish_gradient_sync(self) -> None:
        """Wait for every bucket (launching any not yet complete, e.g. unused parameters, or
        all of them after a backward under :meth:`no_sync`); gradients are then the mean."""
        for bucket in self.buckets[self._next_launch :]:
            self._complete_shares(bucket)
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.ready = 0
            bucket.handle = None
            bucket.divided = [False] * len(bucket.params)
        self._next_launch = 0

    def zero_grad(self) -> None:
        """Drop ``.grad`` (writes nothing): the next backward's first gradient lands in the slot."""
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = None
