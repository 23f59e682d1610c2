"""ZeRO's update: mixed-precision AdamW on this rank's slice, then the slice published to the parameters.

Per group, fp32 master weights and AdamW moments (:class:`~loom.optim.adam.FlatAdamW`)
exist for this rank's slice only, on the device or, for ZeRO-Offload, in host memory. fp32
parameters on the device are their own master weights (the optimizer updates the slice in
place): K = 8 bytes per element, not 12. A step:

1. fp16: an inf or NaN in any rank's shard (of dp, and of tp/pp when the scaler's groups
   say so) skips the step everywhere and backs the loss scale off;
2. the reduced sums become the mean gradient in fp32: times 1 / (N * loss scale), and times
   the clip coefficient :meth:`ZeroAdamW.clip_grad_norm` left (one multiply);
3. AdamW on the master slice (weight decay on matrices only, as ``loom.optim.adamw``); with
   offload, on the host, the transfers overlapped with it (``offload.py``);
4. publish: stages 1-2 all-gather the updated slices into the full compute parameters, in
   one message per ~``GATHER_BATCH_BYTES`` of groups; stage 3 keeps only its slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from loom.distributed.comm import Comm
from loom.optim.adam import FlatAdamW
from loom.optim.scaler import DynamicLossScaler
from loom.parallel.grads import clip_coefficient, global_norm, tensor_norms
from loom.parallel.zero.layout import FlatGroup
from loom.parallel.zero.offload import OffloadStep

GATHER_BATCH_BYTES = 64 * 2**20  # stages 1-2: updated slices all-gathered in batches of about this size


class ZeroAdamW:
    """AdamW over ``groups``' slices (stage 1-3 over ``comm``), with an optional fp16 ``scaler``.

    ``owned32[i]``: group i's owned slice ``[lo, hi)`` in fp32, the master weights' source
    (None where the parameters are fp32 on the optimizer's device: their own master weights).
    """

    def __init__(
        self,
        groups: Sequence[FlatGroup],
        owned32: Sequence[torch.Tensor | None],
        comm: Comm,
        stage: int,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        optim_device: torch.device,
        scaler: DynamicLossScaler | None,
        offload: bool = False,
    ) -> None:
        self.groups, self.comm, self.stage = list(groups), comm, stage
        self.optim_device, self.scaler, self.weight_decay = optim_device, scaler, weight_decay
        for group, values in zip(self.groups, owned32, strict=True):
            # fp32 parameters where the optimizer lives are their own master weights: no second copy;
            # offloaded, the master is always the host's own copy (also on a CPU, where that is one memory)
            alias = group.flat.dtype == torch.float32 and optim_device == group.flat.device and not offload
            if alias:
                master = group.unit.shard if stage == 3 else group.flat[group.lo : group.hi]
            else:
                master = values.to(optim_device, copy=True)
                if offload and group.flat.device.type == "cuda":
                    master = master.pin_memory()  # the copies back to the device run asynchronously
            segments = group.decay_segments(weight_decay)
            group.optim = FlatAdamW(master, segments, lr, betas, eps, holds_master=not alias)
        self.clip_coef = 1.0  # what the next step multiplies the gradient by (clip_grad_norm sets it)
        self.offload = offload
        self._offload_step: OffloadStep | None = None  # built at the first step (the gradient shards exist then)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """fp16: the loss times the scale, before backward; else the loss."""
        return self.scaler.scale_loss(loss) if self.scaler is not None else loss

    def unscale(self) -> float:
        """Reduced sums -> mean gradient: 1 / (N * loss scale)."""
        return 1.0 / (self.comm.size * (self.scaler.scale if self.scaler is not None else 1.0))

    def clip_grad_norm(
        self,
        max_norm: float,
        counts: Callable[[nn.Parameter], bool] | None = None,
        comms: Sequence[Comm] = (),
        carry: torch.Tensor | None = None,
    ) -> float:
        """Global L2 norm of the mean gradient (:func:`~loom.parallel.grads.global_norm` of the owned
        shards over dp and ``comms``); the next :meth:`step` scales by min(1, max_norm / (norm + 1e-6)).
        ``inf``: measure only. ``counts(param)`` says whether this rank's copy counts (a replica
        counts once); call after the gradient sync. ``carry`` rides along, summed over dp and ``comms``
        (:func:`~loom.parallel.grads.global_norm`)."""
        pieces = [
            group.grad_shard[start:stop]
            for group in self.groups
            for param, start, stop in group.owned_ranges()
            if counts is None or counts(param)
        ]
        device = self.groups[0].grad_shard.device
        norm = global_norm(tensor_norms(pieces), [self.comm, *comms], device, carry) * self.unscale()
        if math.isfinite(max_norm):
            self.clip_coef = clip_coefficient(norm, max_norm).item()
        return norm.item()

    @torch.no_grad()
    def step(self, lr: float | None = None) -> bool:
        """Update this rank's slice and publish it; False when fp16 overflow skipped the step."""
        if self.scaler is not None:
            overflow = self.scaler.found_overflow(g.grad_shard for g in self.groups)
            self.scaler.update(overflow)
            if overflow:
                self.clip_coef = 1.0
                return False
        factor, self.clip_coef = self.clip_coef * self.unscale(), 1.0
        if self.offload:  # to the host and back, overlapped with the host's update (offload.py)
            self.offload_step.step(factor, lr)
            self.publish(staged=True)
            return True
        for group in self.groups:
            grad = group.grad_shard.to(self.optim_device, torch.float32, copy=True)
            if factor != 1.0:
                grad.mul_(factor)
            group.optim.step(grad, lr)
        self.publish()
        return True

    @property
    def offload_step(self) -> OffloadStep:
        """ZeRO-Offload's transfers: each group's updated master slice lands in this rank's slice of
        the parameters (stages 1-2: the owned part of the flat buffer; stage 3: the shard)."""
        if self._offload_step is None:
            targets = [g.unit.shard if self.stage == 3 else g.flat[g.lo : g.hi] for g in self.groups]
            self._offload_step = OffloadStep(self.groups, targets, self.groups[0].flat.device)
        return self._offload_step

    @torch.no_grad()
    def publish(self, staged: bool = False) -> None:
        """Every group's master slice to its compute parameters (stages 1-2: all-gathered).
        ``staged``: the slices are already in place (offload copied them back)."""
        if self.stage == 3:
            if not staged:
                for group in self.groups:
                    _copy_unless_same(group.unit.shard, group.optim.master)
            return
        for batch in self._gather_batches():
            self._gather_batch(batch, staged)

    def _gather_batches(self) -> list[list[FlatGroup]]:
        """Consecutive groups, each batch about GATHER_BATCH_BYTES of parameters (at least one group)."""
        batches: list[list[FlatGroup]] = [[]]
        size = 0
        for group in self.groups:
            nbytes = group.padded * group.flat.element_size()
            if batches[-1] and size + nbytes > GATHER_BATCH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(group)
            size += nbytes
        return batches

    def _gather_batch(self, groups: list[FlatGroup], staged: bool = False) -> None:
        """One all-gather for several groups: this rank's slices side by side, gathered, copied out.

        The bytes are those of one all-gather per group ((n-1)/n of the padded sizes), in one
        message instead of many: on gloo, and on shared cores, far fewer waits for peers.
        """
        n = self.comm.size
        owned = [g.flat[g.lo : g.hi] for g in groups]
        for group, slice_ in zip(groups, owned):
            if not staged:
                _copy_unless_same(slice_, group.optim.master)
        if n == 1:
            return
        send = torch.cat(owned)
        rows = torch.empty(n * send.numel(), dtype=send.dtype, device=send.device)
        self.comm.all_gather(rows, send, tag="zero-param")
        rows = rows.view(n, send.numel())
        offset = 0
        for group, slice_ in zip(groups, owned):
            group.flat.view(n, slice_.numel()).copy_(rows[:, offset : offset + slice_.numel()])
            offset += slice_.numel()

    @property
    def bytes_per_element(self) -> int:
        """K: 12 (master weights and both moments), or 8 when the master is the parameters."""
        return self.groups[0].optim.bytes_per_element


def _copy_unless_same(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, skipped when they are one tensor (fp32 parameters as master)."""
    if target.data_ptr() != source.data_ptr():
        target.copy_(source)
