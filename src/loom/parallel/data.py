"""Data parallelism: bucketed gradient all-reduce, overlapped with backward.

Buckets hold parameters in reverse registration order (roughly the order backward
produces their gradients), each closed once it holds ``bucket_mb`` megabytes (so small
biases and norms ride with the matrix before them instead of travelling alone). Each bucket owns one flat
buffer and every parameter's ``.grad`` is a view into it, so gradients accumulate in
place and a bucket is one message with no copies. A post-accumulate-grad hook counts the
bucket's gradients; when the last one lands, the bucket's all-reduce (sum) starts
asynchronously while backward carries on with earlier layers. Buckets are launched in
index order on every rank (a ready bucket waits for its predecessors), so the
collectives match across ranks whatever order the hooks fire in.

The mean needs a division by n. A bucket divides its buffer before sending, unless the
step's losses went through :meth:`scale_loss` (loss / n, a scalar): backward then yields
gradients already divided, and the pass over every gradient is saved.

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


class GradientSync:
    """What DDP and ZeRO share: ``sync_enabled``, off inside :meth:`no_sync`."""

    sync_enabled: bool = True

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (earlier micro-batches of a step): nothing is sent."""
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous


class DataParallel(GradientSync):
    """Wraps ``model``'s gradients (not its forward): call backward as usual, then sync."""

    def __init__(self, model: nn.Module, comm: Comm, bucket_mb: float = 25.0) -> None:
        self.model = model
        self.comm = comm
        self.sync_enabled = True
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = self._make_buckets(list(reversed(params)), int(bucket_mb * 2**20))
        self._next_launch = 0
        self._loss_divided = False  # this step's losses went through scale_loss
        self._slot_of = {id(p): (b, o) for b in self.buckets for p, o in zip(b.params, b.offsets)}
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
        groups = [g for g in groups if g]
        buckets = []
        for group in groups:
            buffer = torch.zeros(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            bucket = Bucket(group, buffer)
            offset = 0
            for p in group:
                bucket.offsets.append(offset)
                p.grad = buffer[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            buckets.append(bucket)
        return buckets

    @property
    def parameter_bytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss / n`` for backward: its gradients come out divided, so buckets skip that pass.

        Use it for every backward of a step or for none (the buckets then divide), and only
        where every gradient of this rank comes from such a loss: a pipeline stage fed
        gradients by the next stage gets them already divided there, and must not skip.
        """
        self._loss_divided = True
        return loss / self.comm.size

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket, offset = self._slot_of[id(param)]
        self._keep_in_bucket(param, bucket.buffer[offset : offset + param.numel()])
        if not self.sync_enabled:
            return
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
        if not self._loss_divided:  # divide before the sum, inside backward, so the mean costs nothing after it
            bucket.buffer.div_(self.comm.size)
        bucket.handle = self.comm.all_reduce(bucket.buffer, op="sum", async_op=True, tag="grad")
        self._next_launch += 1

    def finish_gradient_sync(self) -> None:
        """Wait for every bucket (launching any whose parameters got no gradient) and average."""
        for bucket in self.buckets[self._next_launch :]:
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.ready = 0
            bucket.handle = None
        self._next_launch = 0
        self._loss_divided = False
        self._restore_views()

    def zero_grad(self) -> None:
        """Zero the bucket buffers in place, keeping ``.grad`` as views into them."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
        self._restore_views()

    @staticmethod
    def _keep_in_bucket(param: nn.Parameter, slot: torch.Tensor) -> None:
        """Autograd accumulates into the view in place; should it ever replace it, copy back."""
        if param.grad.data_ptr() != slot.data_ptr():
            slot.copy_(param.grad.reshape(-1))
            param.grad = slot.view_as(param)

    def _restore_views(self) -> None:
        for bucket in self.buckets:
            for p, offset in zip(bucket.params, bucket.offsets):
                slot = bucket.buffer[offset : offset + p.numel()]
                if p.grad is None or p.grad.data_ptr() != slot.data_ptr():
                    p.grad = slot.view_as(p)
