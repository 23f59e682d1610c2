"""1-bit Adam on ZeRO-1/2's flat buffers: the compressed phase over the sharded optimizer states.

During the warm-up ZeRO runs its own AdamW (reduce-scatter, update of the owned slice,
all-gather). From step ``freeze_step + 1`` on, as the plain path's
:class:`~loom.optim.onebit.OneBitAdam`, every rank keeps its local gradient (the whole step
runs under ``no_sync``: the full-size buffers, stage 2's included, hold it) and one
:class:`~loom.distributed.compressed.CompressedAllReduce` over dp carries the momentum in the
frozen variance's basis, all groups as one vector (padding included, as zeros):

- at the freeze, once: each rank's slice of ``1/D`` (``D = sqrt(v / (1 - b2^f)) + eps``, 0
  where the variance is 0: a parameter that never had a gradient stays put) and of ``m/D``
  are all-gathered (fp32, tagged "onebit-freeze"), so every rank holds ``1/D`` in full;
- a step: ``x = b1 u + (1 - b1) g / D`` (``u``, last step's decoded mean ``m/D``, kept as
  the 1/32-size message it came in; ``g``, this rank's gradient), clamped to Adam's own bound
  (:func:`loom.optim.onebit.adam_bound`), the compressed mean
  ``u <- mean(x)``, and the update ``p <- p (1 - lr wd) - lr u / (1 - b1^t)`` on matrices'
  decay as AdamW's. This is the plain path's step (``m = b1 m + (1 - b1) g`` and
  ``mean(m / D)``) written in the basis the message already has.

Who applies it: where the fp32 parameters are their own master weights, every rank decodes
the same ``u`` and updates the whole flat buffer with the same operations, so the replicas
stay equal bit for bit and nothing else is sent: about 1/32 of AdamW's dp bytes. With
16-bit parameters (or offload) the fp32 master exists for the owned slice only: the owner
updates it and ZeRO's all-gather publishes the parameters, so a step sends the compressed
momentum plus one all-gather of 16-bit parameters (about (1/16 + 1)/2 of ZeRO's 16-bit
bytes). The owned slice of ``m`` is kept as ``u D`` so a checkpoint holds AdamW's state.

Memory: per rank ``1/D`` in full (4 bytes a parameter) beside the compressor's worker
error (4 bytes a parameter, inherent to error feedback), both counted in the optimizer's
bytes; stage 2 holds the full local gradient during a compressed step. Stage 3 cannot run
this (each unit's gradient is reduced and freed inside backward, and no rank holds the
parameters in full to apply ``u``); :meth:`loom.config.Config.validate` refuses it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loom.distributed.comm import Comm
from loom.distributed.compressed import CompressedMeans
from loom.optim.onebit import adam_bound, check_freeze_step
from loom.optim.scaler import DynamicLossScaler
from loom.parallel.zero.layout import FlatGroup
from loom.parallel.zero.update import ZeroAdamW


class ZeroOneBit:
    """1-bit Adam's compressed phase for the ZeRO-1/2 optimizer whose parts are ``update`` (module
    docstring); ``comm`` is the dp group."""

    def __init__(
        self,
        update: ZeroAdamW,
        comm: Comm,
        freeze_step: int,
        replica_class: Callable[[torch.Tensor], str] = lambda p: "all",
    ) -> None:
        check_freeze_step(freeze_step)
        if update.stage not in (1, 2):
            raise ValueError(f"1-bit Adam runs with ZeRO stage 1 or 2, not {update.stage}")
        self.update, self.comm, self.freeze_step = update, comm, freeze_step
        self.groups: list[FlatGroup] = update.groups
        self.total = sum(g.padded for g in self.groups)
        # each replica class's ranges of the whole vector (groups side by side, padding in none):
        # compressed apart, so tp replicas decode the same mean (CompressedMeans)
        self.ranges: dict[str, list[tuple[int, int]]] = {}
        base = 0
        for group in self.groups:
            for param, offset in zip(group.params, group.offsets):
                key = replica_class(param)
                self.ranges.setdefault(key, []).append((base + offset, base + offset + param.numel()))
            base += group.padded
        self.ranges = dict(sorted(self.ranges.items()))
        self.means: CompressedMeans | None = None
        self.inverse: torch.Tensor | None = None  # 1 / D in full (0 where the variance is 0)
        self._first: torch.Tensor | None = None  # u at the freeze (later: the reducer's last message)
        self._restored = False  # the compressor's buffers came from a checkpoint: u is its last message

    @property
    def steps(self) -> int:
        return self.groups[0].optim.step_count

    @property
    def compressing(self) -> bool:
        """Whether the next step communicates the momentum (the gradients stay local)."""
        return self.steps >= self.freeze_step

    @property
    def nbytes(self) -> int:
        """What the compressed phase holds beyond ZeRO's states: 1/D and the compressor's buffers."""
        held = self.inverse.numel() * self.inverse.element_size() if self.inverse is not None else 0
        return held + (self.means.nbytes if self.means is not None else 0)

    # ------------------------------------------------------------------ the freeze

    def _freeze(self, device: torch.device) -> None:
        """All-gather every group's slices of 1/D and m/D: every rank holds both in full (m/D is
        the first step's u, unless a checkpoint restored the last message)."""
        n = self.comm.size
        owned = []
        for group in self.groups:
            optim = group.optim
            bias = 1 - optim.betas[1] ** self.freeze_step
            denominator = (optim.exp_avg_sq / bias).sqrt_().add_(optim.eps)
            inverse = torch.where(optim.exp_avg_sq > 0, denominator.reciprocal(), 0.0)
            owned.append(torch.stack([inverse, optim.exp_avg * inverse]).to(device))
        send = torch.cat(owned, dim=1)
        rows = torch.empty(n, *send.shape, dtype=send.dtype, device=device)
        if n > 1:
            self.comm.all_gather(rows.view(-1), send.reshape(-1), tag="onebit-freeze")
        else:
            rows[0].copy_(send)
        inverse, first, offset = [], [], 0
        for group, piece in zip(self.groups, owned):
            width = piece.shape[1]
            block = rows[:, :, offset : offset + width]  # (n ranks, 2, width): the group's slices in rank order
            inverse.append(block[:, 0].reshape(-1)[: group.padded])
            first.append(block[:, 1].reshape(-1)[: group.padded])
            offset += width
        self.inverse = torch.cat(inverse)
        self._first = None if self._restored else torch.cat(first)

    def _means(self, device: torch.device) -> CompressedMeans:
        if self.means is None:
            self.means = CompressedMeans(self.comm, device, tag="onebit")
        return self.means

    def _size(self, key: str) -> int:
        return sum(b - a for a, b in self.ranges[key])

    def _gather(self, vector: torch.Tensor, key: str) -> torch.Tensor:
        return torch.cat([vector[a:b] for a, b in self.ranges[key]])

    def _scatter(self, vector: torch.Tensor, key: str, values: torch.Tensor) -> None:
        offset = 0
        for a, b in self.ranges[key]:
            vector[a:b] = values[offset : offset + b - a]
            offset += b - a

    # ------------------------------------------------------------------ one step

    def local_grads(self) -> list[torch.Tensor]:
        """This rank's gradient buffers, full size (each group's; zeros where none landed)."""
        out = []
        for group in self.groups:
            if group.grad_full is None:
                group.grad_full = torch.zeros(group.padded, dtype=group.grad_shard.dtype, device=group.flat.device)
            out.append(group.grad_full)
        return out

    @torch.no_grad()
    def step(self, lr: float, scaler: DynamicLossScaler | None) -> bool:
        """One compressed step from the local gradients; False when fp16 overflow skipped it."""
        grads = self.local_grads()
        device = grads[0].device
        if scaler is not None:
            overflow = scaler.found_overflow(grads)
            scaler.update(overflow)
            if overflow:
                return False
        if self.inverse is None:
            self._freeze(device)
        means = self._means(device)
        previous = self._first
        if previous is None:  # the last messages, decoded
            previous = torch.zeros(self.total, dtype=torch.float32, device=device)
            for key in self.ranges:
                self._scatter(previous, key, means.reducer(key, self._size(key)).last())
        self._first = None
        beta1 = self.groups[0].optim.betas[0]
        gradient = torch.cat([g.float() for g in grads])
        if scaler is not None:
            gradient.mul_(1.0 / scaler.scale)
        mask = self.inverse > 0
        x = (previous * mask).mul_(beta1).add_(gradient.mul_(self.inverse), alpha=1 - beta1)
        bound = adam_bound(self.groups[0].optim.betas)  # loom.optim.onebit.adam_bound
        x.clamp_(-bound, bound)
        if self.comm.size > 1:
            mean = torch.zeros_like(x)
            for key in self.ranges:
                self._scatter(mean, key, means(key, self._gather(x, key)))
            x = mean
        mean = x * mask
        offset, publish = 0, False
        for group in self.groups:
            u = mean[offset : offset + group.padded]
            offset += group.padded
            optim = group.optim
            optim.step_count += 1
            step_size = lr / (1 - beta1**optim.step_count)
            inverse = self.inverse[offset - group.padded : offset]
            owned = slice(group.lo, group.hi)
            if optim.holds_master:  # the owner's fp32 master, then ZeRO's all-gather publishes it
                for start, stop, weight_decay in optim.segments:
                    optim.master[start:stop].mul_(1 - lr * weight_decay)
                optim.master.add_(u[owned].to(optim.master.device), alpha=-step_size)
                publish = True
            else:  # fp32 parameters are the master: every rank updates the whole buffer alike
                decay = self.update.weight_decay
                for param, start in zip(group.params, group.offsets):
                    if param.dim() >= 2 and decay:
                        group.flat[start : start + param.numel()].mul_(1 - lr * decay)
                group.flat.add_(u, alpha=-step_size)
            # AdamW's momentum for checkpoints: m = u D (0 where the variance is 0)
            m = torch.where(inverse[owned] > 0, u[owned] / inverse[owned], 0.0)
            optim.exp_avg.copy_(m.to(optim.exp_avg.device))
        if publish:
            self.update.publish()
        return True

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, torch.Tensor]:
        """The compressors' buffers (error feedback, last message) per class; {} before the first
        compressed step."""
        return self.means.state_dict() if self.means is not None else {}

    def state_names(self) -> list[str]:
        return CompressedMeans.names(list(self.ranges))

    def load_state(self, state: dict[str, torch.Tensor] | None, device: torch.device) -> bool:
        """Restore :meth:`state` saved by the same layout (True), else start the error feedback afresh
        (False): its chunks would mean other values. 1/D is rebuilt from the optimizer's slices at
        the next step, and u from the restored last message (else from m/D)."""
        self.means, self.inverse, self._first, self._restored = None, None, None, False
        if not state or not self.compressing:
            return False
        means = self._means(device)
        means.load_state_dict(state)
        try:  # each class's buffers, checked against this layout's sizes
            for key in self.ranges:
                means.reducer(key, self._size(key)).load_state_dict(
                    {k.removeprefix(f"{key}."): v for k, v in state.items() if k.startswith(f"{key}.")}
                )
        except ValueError:
            self.means = None
            return False
        self._restored = True
        return True
