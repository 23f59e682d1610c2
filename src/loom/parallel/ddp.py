"""Data parallelism: bucketed gradient all-reduce, overlapped with backward.

Buckets hold parameters in reverse registration order (roughly the order backward
produces their gradients), each closed once it holds ``bucket_mb`` megabytes (so small
biases and norms ride with the matrix before them instead of travelling alone). Each bucket
owns one flat buffer and every parameter's ``.grad`` is a view into it, so a bucket is one
message with no copies at send time. :meth:`zero_grad` drops the views: the step's first
gradient arrives as autograd's own tensor and the hook copies it into its slot (one pass;
zeroing the buffer and adding into it cost twice the traffic), later micro-batches accumulate
into the view in place. A linear's weight skips even that copy: DDP is the
:class:`~loom.parallel.grad_fusion.GradHome` of its model's linears (:meth:`grad_slot`), whose
dW GEMM then writes the slot itself (:mod:`loom.parallel.grad_fusion`). A post-accumulate-grad
hook counts the bucket's gradients (it runs once per parameter per backward, fused or not); when the
last one lands, the bucket's all-reduce (sum) starts asynchronously while backward carries on
with earlier layers. Buckets are launched in
index order on every rank (a ready bucket waits for its predecessors), so the
collectives match across ranks whatever order the hooks fire in.

The mean needs a division by n. A bucket divides its buffer before sending, unless the
step's losses went through :meth:`scale_loss` (loss / n, a scalar): backward then yields
gradients already divided, and the pass over every gradient is saved.

Two things ride along, so that the step after backward waits on nothing it could have
had earlier:

* :meth:`carry` puts a scalar (the step's loss, for the metrics) into one slot past the
  gradients of the bucket launched last, so its dp mean costs no collective of its own;
* with ``measure_norm``, :meth:`finish_gradient_sync` takes each bucket's L2 norm as soon
  as that bucket's all-reduce completes, while the later ones are still in flight, and
  :meth:`take_grad_norm` returns the global norm sqrt(sum_p ||g_p||^2) for clipping.

Transport: the buckets travel through the process group's backend (gloo, nccl), or, for
CPU ranks of one host, through shared memory (:mod:`loom.distributed.shm`): the buckets then live
in ``/dev/shm`` and each rank sums its chunk of every peer's bucket in place, with no socket
in the way. ``transport="auto"`` picks shared memory where it can serve the group.

Invariant: after :meth:`finish_gradient_sync` each rank's gradients equal the mean of the
dp ranks' local gradients; per step every rank sends 2(n-1)/n * (parameter bytes) (ring),
plus 2(n-1)/n * 4 bytes for a carried fp32 scalar. Inside :meth:`no_sync` (gradient
accumulation) nothing is sent.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from loom.distributed import shm
from loom.distributed.comm import Comm
from loom.distributed.context import BACKSTOP_S
from loom.errors import LoomError
from loom.parallel.grads import clip_coefficient, global_norm, tensor_norms
from loom.parallel.memory import tensor_bytes

TRANSPORTS = ("auto", "shm", "backend")


@dataclass
class Bucket:
    """One all-reduce: ``buffer[:numel]`` holds its parameters' gradients back to back.

    The bucket launched last has one more element, the slot a carried scalar travels in.
    """

    params: list[nn.Parameter]
    buffer: torch.Tensor
    numel: int
    start: int = 0  # where ``buffer`` begins in the transport's flat buffer (shm)
    ready: int = 0
    handle: object | None = None
    offsets: list[int] = field(default_factory=list)

    @property
    def grads(self) -> torch.Tensor:
        """The gradients alone (a view: without the carry slot)."""
        return self.buffer[: self.numel]


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
    """Wraps ``model``'s gradients (not its forward): call backward as usual, then sync.

    ``measure_norm``: take the gradients' global L2 norm during the sync (for clipping);
    only meaningful where this rank's gradients are the whole model's, each once (no tp
    shards, no pipeline stages) and nothing rescales them after the sync (no fp16 unscale).

    ``transport``: ``"backend"`` all-reduces through the process group (gloo, nccl);
    ``"shm"`` through shared memory (:mod:`loom.distributed.shm`: CPU ranks of one host), an error
    where it cannot; ``"auto"`` takes shm where it can, else the backend. ``timeout_s`` is the
    run's collective timeout (``parallel.timeout_s``, the watchdog's): a shared-memory bucket's
    wait, which the ledger shows pending so the watchdog reports it first, raises after
    ``timeout_s + BACKSTOP_S``; the wait for peers to finish reading this rank's buckets, which
    no ledger entry covers, after ``timeout_s`` itself.
    """

    def __init__(
        self,
        model: nn.Module,
        comm: Comm,
        bucket_mb: float = 25.0,
        measure_norm: bool = False,
        transport: str = "backend",
        timeout_s: float = 300.0,
    ) -> None:
        self.model = model
        self.comm = comm
        self.sync_enabled = True
        self.measure_norm = measure_norm
        params = [p for p in model.parameters() if p.requires_grad]
        groups = self._group(list(reversed(params)), int(bucket_mb * 2**20))
        self.buckets = self._make_buckets(groups, transport, timeout_s)
        self._next_launch = 0
        self._loss_divided = False  # this step's losses went through scale_loss
        self._carried: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        # (param, bucket, offset, data_ptr of its slot): the hooks compare pointers, they build no views
        self._slots = [(p, b, o, b.buffer[o:].data_ptr()) for b in self.buckets for p, o in zip(b.params, b.offsets)]
        self._slot_of = {id(p): (b, o, ptr) for p, b, o, ptr in self._slots}
        self._views = {id(p): b.buffer[o : o + p.numel()].view_as(p) for p, b, o, _ in self._slots}
        # what the gradients hold: each is a view of its bucket from its first backward on
        self.grad_bytes = tensor_bytes(b.buffer for b in self.buckets)
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @staticmethod
    def _group(params: list[nn.Parameter], cap_bytes: int) -> list[list[nn.Parameter]]:
        """Consecutive parameters of one dtype, cut once a group holds ``cap_bytes``."""
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
        return [g for g in groups if g]

    def _make_buckets(self, groups: list[list[nn.Parameter]], transport: str, timeout_s: float) -> list[Bucket]:
        """One flat zeroed buffer per bucket, carved from shared memory when the transport is shm."""
        self.shm = None
        if not groups:  # nothing trainable on this rank
            return []
        sizes = [sum(p.numel() for p in g) for g in groups]
        sizes[-1] += 1  # the carry slot, in the bucket launched last
        self.shm = self._shared_memory(groups, sum(sizes), transport, timeout_s)
        if self.shm is not None:
            buffers = list(self.shm.buffer.split(sizes))
        else:
            buffers = [torch.zeros(n, dtype=g[0].dtype, device=g[0].device) for g, n in zip(groups, sizes)]
        buckets = []
        start = 0
        for group, buffer in zip(groups, buffers):
            bucket = Bucket(group, buffer, sum(p.numel() for p in group), start=start)
            start += buffer.numel()
            offset = 0
            for p in group:
                bucket.offsets.append(offset)
                p.grad = buffer[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            buckets.append(bucket)
        return buckets

    def _shared_memory(
        self, groups: list[list[nn.Parameter]], numel: int, transport: str, timeout_s: float
    ) -> shm.ShmAllReduce | None:
        if transport not in TRANSPORTS:
            raise LoomError(
                f"ddp.transport = {transport!r} is not one of {', '.join(TRANSPORTS)}.",
                "use auto (shared memory where the ranks share a host), shm or backend.",
            )
        if transport == "backend" or self.comm.size == 1:
            return None
        first = groups[0][0]
        dtypes = {p.dtype for g in groups for p in g}
        reason = (
            f"the gradients mix {len(dtypes)} dtypes"
            if len(dtypes) > 1
            else shm.unavailable(self.comm, first.device, numel * first.element_size())
        )
        if reason is None:
            return shm.ShmAllReduce(self.comm, numel, first.dtype, timeout_s + BACKSTOP_S, quiesce_timeout_s=timeout_s)
        if transport == "shm":
            raise LoomError(
                f"ddp.transport = 'shm' cannot serve the {self.comm.name} group: {reason}.",
                "set ddp.transport = 'auto' (shared memory where it can) or 'backend'.",
            )
        return None

    @property
    def transport(self) -> str:
        """What carries the buckets: ``"shm"`` or ``"backend"``."""
        return "shm" if self.shm is not None else "backend"

    @property
    def parameter_bytes(self) -> int:
        return sum(b.numel * b.buffer.element_size() for b in self.buckets)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss / n`` for backward: its gradients come out divided, so buckets skip that pass.

        Use it for every backward of a step or for none (the buckets then divide), and only
        where every gradient of this rank comes from such a loss: a pipeline stage fed
        gradients by the next stage gets them already divided there, and must not skip.
        """
        self._loss_divided = True
        return loss / self.comm.size

    def carry(self, value: torch.Tensor) -> bool:
        """Average the one-element ``value`` over dp with this step's gradients, in place.

        Call before the step's last backward. The value travels in the last bucket's
        message (sum, then / n as ``Comm.all_reduce(op="avg")`` does), so it costs no
        collective of its own; after :meth:`finish_gradient_sync` it holds the dp mean.
        Returns False, carrying nothing, where the slot could not hold it exactly (a
        16-bit gradient bucket): then average it yourself.
        """
        if value.numel() != 1:
            raise ValueError(f"carry takes a one-element tensor, got shape {tuple(value.shape)}")
        if not self.buckets:
            return False
        if self.buckets[-1].handle is not None:
            raise RuntimeError("carry came after the last bucket left: call it before the step's last backward")
        slot_dtype = self.buckets[-1].buffer.dtype
        if slot_dtype != torch.float32 or value.dtype != torch.float32:
            return False
        self._carried = value
        return True

    def grad_slot(self, param: torch.Tensor) -> torch.Tensor | None:
        """The view of ``param``'s bucket slot, param-shaped, that its ``.grad`` is between syncs
        (None for a parameter this DDP does not hold): where a fused linear writes dW."""
        return self._views.get(id(param))

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket, _, ptr = self._slot_of[id(param)]
        if param.grad.data_ptr() != ptr:
            self._keep_in_bucket(param, self._views[id(param)])
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
        if bucket.ready < len(bucket.params):  # launched by the sync, not by its last hook
            self._zero_missing(bucket)
        grads = bucket.grads
        if not self._loss_divided:  # divide before the sum, inside backward, so the mean costs nothing after it
            grads.div_(self.comm.size)
        message = grads
        if self._carried is not None and bucket is self.buckets[-1]:
            bucket.buffer[-1:].copy_(self._carried.reshape(1))
            message = bucket.buffer
        if self.shm is not None:
            bucket.handle = self.shm.all_reduce(bucket.start, message.numel(), tag="grad")
        else:
            # its wait blocks: polling there took the cores the backend's threads need for the
            # buckets still in flight (2 gloo ranks on 2 cores: 1% slower a step, 4 ms more CPU)
            bucket.handle = self.comm.all_reduce(message, op="sum", async_op=True, tag="grad", poll=False)
        self._next_launch += 1

    def finish_gradient_sync(self) -> None:
        """Wait for every bucket (launching any whose parameters got no gradient) and average.

        With ``measure_norm`` each bucket's norm is taken as soon as its own all-reduce is
        done, while later buckets are still on the wire.
        """
        for bucket in self.buckets[self._next_launch :]:
            self._launch(bucket)
        norms = []
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            if self.measure_norm:  # per parameter, as clip_grad_norm_ does (one long vector_norm rounds worse)
                norms += tensor_norms([p.grad for p in bucket.params])
            bucket.ready = 0
            bucket.handle = None
        if self.shm is not None:
            self.shm.quiesce()  # peers are done reading this rank's buckets: they may change again
        if self._carried is not None:
            self._carried.copy_(self.buckets[-1].buffer[-1:].reshape(self._carried.shape) / self.comm.size)
            self._carried = None
        # buckets run in reverse registration order: reversed, the norms are in clip_grad_norm_'s order
        self._grad_norm = global_norm(norms[::-1], (), self.buckets[0].buffer.device) if norms else None
        self._next_launch = 0
        self._loss_divided = False
        self._restore_views()

    def take_grad_norm(self) -> torch.Tensor | None:
        """The global L2 norm of the gradients the last sync produced (``measure_norm``), once.

        None when not measured, or already taken: it describes the gradients as the sync
        left them, so take it before anything else changes them.
        """
        norm, self._grad_norm = self._grad_norm, None
        return norm

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip in place to ``max_norm`` (inf: measure only) by the norm the sync measured.

        The same norm as ``torch.nn.utils.clip_grad_norm_`` on the synced gradients (the same
        per-parameter norms, combined in the same order), without its pass to measure them:
        that ran during the sync. Returns the norm before clipping.
        """
        norm = self.take_grad_norm()
        if norm is None:
            raise RuntimeError(
                "no gradient norm was measured: build DataParallel with measure_norm=True "
                "and call finish_gradient_sync first"
            )
        if math.isfinite(max_norm):
            coef = clip_coefficient(norm, max_norm)  # in the norm's dtype, as clip_grad_norm_ computes it
            if coef.item() < 1.0:  # (times 1.0 would change nothing)
                torch._foreach_mul_([b.grads for b in self.buckets], coef)
        return norm.item()

    def close(self) -> None:
        """Stop the shared-memory worker, if any (the buffers stay usable as plain memory)."""
        if self.shm is not None:
            self.shm.close()

    def zero_grad(self) -> None:
        """Drop every ``.grad`` (None): the next backward's first gradient is copied into its slot.

        Autograd hands a parameter without ``.grad`` its fresh gradient as is; the hook copies
        it into the bucket (one pass). Zeroing the buffers instead would cost a pass to zero
        and an in-place add reading both: twice the memory traffic for the same result.
        """
        for p, _, _, _ in self._slots:
            p.grad = None
        self._grad_norm = None

    @staticmethod
    def _zero_missing(bucket: Bucket) -> None:
        """Zeros in the slots of parameters that got no gradient this step (not last step's)."""
        for p, offset in zip(bucket.params, bucket.offsets):
            if p.grad is None:
                slot = bucket.buffer[offset : offset + p.numel()]
                slot.zero_()
                p.grad = slot.view_as(p)

    @staticmethod
    def _keep_in_bucket(param: nn.Parameter, slot: torch.Tensor) -> None:
        """Copy a gradient autograd put elsewhere (the step's first, after :meth:`zero_grad`) into
        its slot (the parameter-shaped view of :meth:`grad_slot`); later ones then accumulate into
        the view in place."""
        slot.copy_(param.grad)
        param.grad = slot

    def _restore_views(self) -> None:
        for p, _, _, ptr in self._slots:
            if p.grad is None or p.grad.data_ptr() != ptr:
                p.grad = self._views[id(p)]
