"""ZeRO-Offload's step: gradient shards to the host, AdamW there, the updated slices back, overlapped.

The master weights and moments of this rank's slices live in host memory (Ren et al., 2021).
One step over groups g_1 .. g_k:

1. every group's reduced gradient shard is copied into its host buffer, all copies issued at
   once on a side stream, each recording an event;
2. the host waits only for g_i's event, then steps g_i (mean gradient in fp32, clip factor,
   AdamW on the master slice), while the copies of later groups are still in flight;
3. g_i's updated master slice is copied back at once, on the side stream, straight into the
   device tensor that holds this rank's slice of the parameters (stages 1-2: the owned part
   of the flat buffer; stage 3: the persistent shard), while the host steps g_{i+1};
4. the compute stream waits for the side stream before anything reads the parameters.

Host buffers are pinned where a GPU exists, so the copies are asynchronous. On a machine
without one there is no side stream and host and device are one memory: the same buffers,
copies and order run synchronously, so the path is exercised (and compared bitwise with the
device run's update) everywhere. ``bytes_to_host`` / ``bytes_to_device`` count what moved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from loom.parallel.zero.layout import FlatGroup


class OffloadStep:
    """Transfers and host update of ``groups`` (their ``optim`` on the host); ``targets[i]``: the
    device tensor group i's updated master slice is copied into."""

    def __init__(self, groups: Sequence[FlatGroup], targets: Sequence[torch.Tensor], device: torch.device) -> None:
        self.groups, self.targets = list(groups), list(targets)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.host_grads = [
            torch.empty(g.hi - g.lo, dtype=g.grad_shard.dtype, pin_memory=self.cuda) for g in self.groups
        ]
        self.sent: list[torch.cuda.Event | None] = [None] * len(self.groups)  # last step's copies back
        self.bytes_to_host = 0
        self.bytes_to_device = 0

    @contextlib.contextmanager
    def _side(self) -> Iterator[None]:
        """Run the enclosed copies on the side stream, after what the compute stream has queued."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def _event(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    @torch.no_grad()
    def step(self, factor: float, lr: float | None) -> None:
        """One update of every group: scale the reduced sums by ``factor`` (1 / (N x loss scale) x
        clip coefficient), AdamW at ``lr``, and the updated slices into ``targets``."""
        arrived = []
        for group, host in zip(self.groups, self.host_grads):
            with self._side():
                host.copy_(group.grad_shard, non_blocking=self.cuda)
            arrived.append(self._event())
            self.bytes_to_host += host.numel() * host.element_size()
        for i, (group, host, target) in enumerate(zip(self.groups, self.host_grads, self.targets)):
            for event in (arrived[i], self.sent[i]):
                if event is not None:  # this group's gradients are here, its last copy back has left
                    event.synchronize()
            grad = host.to(torch.float32)  # the host buffer itself when it is fp32: scratch, scaled in place
            if factor != 1.0:
                grad.mul_(factor)
            group.optim.step(grad, lr)
            with self._side():
                target.copy_(group.optim.master, non_blocking=self.cuda)
            self.sent[i] = self._event()
            self.bytes_to_device += target.numel() * target.element_size()
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
