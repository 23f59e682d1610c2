"""0/1 Adam (Lu et al. 2022): 1-bit Adam's compressed momentum, with the variance updated on an
exponentially thinning set of steps instead of frozen once, and, once the variance is frozen,
local steps that skip dp communication altogether between synchronisations.

Step ``t`` (1-based) is one of three kinds, fixed by :class:`ZeroOneSchedule` alone (so every
rank, and a resumed run, agrees):

- **variance step** (``t`` in T_v, all ``t <= var_freeze_step``): the gradients are averaged over
  dp in full precision (DDP), and AdamW's update runs with both moments taking them:
  ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``p -= lr (m / (1 - b1^t) / D + wd p)``
  with ``D = sqrt(v / (1 - b2^k)) + eps`` and ``k`` the number of variance steps so far (v's own
  count: with b2 = 0.999 and gaps between its updates, torch's ``1 - b2^t`` would shrink D
  several times). T_v starts with every step; after each ``var_update_scaler`` of its steps its
  interval doubles (``1, 2, 4, ...``; a step is in T_v when the interval divides it).
- **compressed step** (the others up to ``var_freeze_step``): the gradients stay local; their
  mean goes through the error-compensated 1-bit all-reduce in the latest variance's basis
  (``mean(g / D)``, each value clamped to :func:`gradient_bound`) and into the momentum, which
  is exact but for that: ``m = b1 m + (1 - b1) mean(g)``, as in the paper and DeepSpeed. (Sending
  the whole momentum instead, as 1-bit Adam does after its freeze, put a 1-bit error into every
  such step's whole update and cost the demo 0.4 of validation loss: measured.)
- after ``var_freeze_step`` the variance is frozen and the **local step interval** ``H`` starts
  at 1 and doubles after every ``local_step_scaler`` steps, up to ``local_step_clipper``. A step
  that ``H`` divides synchronises, the others are **local**: ``m`` takes this rank's own gradient
  and the parameters move by this rank's own ``m / D``, with no communication. The first local
  step after a synchronisation keeps the parameters as the anchor ``A``; at the next
  synchronisation each rank's movement since then, as the average update
  ``u = (A prod(1 - lr wd) - p) / L`` with ``L = sum lr_t / (1 - b1^t)`` (weights decayed
  alike, so ``u`` is a weighted mean of the clamped ``m / D``), is averaged by the compressed
  all-reduce, and every rank sets ``p = A prod(1 - lr wd) - L mean(u)`` and ``m = mean(u) D``:
  computed from values equal on every rank, so the replicas are equal bit for bit again. With
  ``H = 1`` (``local_step_scaler`` steps after the freeze, DeepSpeed's default 32678) a
  synchronising step is 1-bit Adam's compressed step. The error feedback starts afresh at the
  freeze (it held gradients, it now holds momenta), as DeepSpeed's does.

:meth:`ZeroOneAdam.settle` synchronises pending local steps early; the trainer calls it before it
evaluates or writes a checkpoint, so both see the one model every rank agrees on.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loom.distributed.comm import Comm
from loom.distributed.compressed import CompressedMeans
from loom.optim.onebit import OneBitAdam, adam_bound

VARIANCE, COMPRESSED, LOCAL, SYNC = "full", "compressed", "local", "sync"


def gradient_bound(betas: tuple[float, float]) -> float:
    """The largest ``|g / D|`` a gradient the variance had taken could reach: ``v >= (1 - b2) g^2``
    and ``D^2 = v / (1 - b2^k) >= v``, so ``|g| / D <= 1 / sqrt(1 - b2)`` (4.5 for b2 = 0.95, 32
    for 0.999). A compressed step between variance steps clamps each ``g / D`` to it, for the
    reason :func:`~loom.optim.onebit.adam_bound` gives: one outgrown value sets its chunk's scale."""
    return 1 / math.sqrt(1 - betas[1])


@dataclass(frozen=True)
class ZeroOneSchedule:
    """Which kind each step is (module docstring); names and defaults as DeepSpeed's ZeroOneAdam."""

    var_freeze_step: int
    var_update_scaler: int = 16
    local_step_scaler: int = 32678
    local_step_clipper: int = 16

    def __post_init__(self) -> None:
        for name in ("var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        steps, interval, count, t = [], 1, 0, 0
        while True:  # T_v up to the freeze: the interval doubles after each var_update_scaler of its steps
            t += interval - t % interval
            if t > self.var_freeze_step:
                break
            steps.append(t)
            count += 1
            if count == self.var_update_scaler:
                count, interval = 0, interval * 2
        object.__setattr__(self, "_variance_steps", tuple(steps))
        object.__setattr__(self, "_variance_set", frozenset(steps))

    def variance_steps(self) -> tuple[int, ...]:
        """T_v: the steps whose gradients are averaged in full and update the variance."""
        return self._variance_steps  # type: ignore[attr-defined]

    def variance_count(self, t: int) -> int:
        """How many steps of T_v are ``<= t``."""
        return bisect.bisect_right(self.variance_steps(), t)

    def local_interval(self, t: int) -> int:
        """H at step ``t > var_freeze_step``: 1, doubled after every ``local_step_scaler`` steps, at
        most ``local_step_clipper``."""
        doublings = (t - self.var_freeze_step - 1) // self.local_step_scaler
        return min(self.local_step_clipper, 2 ** min(doublings, 62))

    def has_local_steps(self, steps: int) -> bool:
        """Whether a run of ``steps`` steps takes a local step: H reaches 2 at
        ``t0 = var_freeze_step + local_step_scaler + 1``, and the first odd step from there is local."""
        first = self.var_freeze_step + self.local_step_scaler + 1
        return self.local_step_clipper >= 2 and steps >= first + (first % 2 == 0)

    def kind(self, t: int) -> str:
        """``"full"`` (variance step), ``"compressed"``, ``"local"`` or ``"sync"`` for step ``t``."""
        if t <= self.var_freeze_step:
            return VARIANCE if t in self._variance_set else COMPRESSED  # type: ignore[attr-defined]
        return SYNC if t % self.local_interval(t) == 0 else LOCAL


class ZeroOneAdam(OneBitAdam):
    """0/1 Adam over ``comm`` (module docstring) around the run's ``torch.optim.AdamW``."""

    def __init__(
        self,
        adamw: torch.optim.AdamW,
        comm: Comm,
        schedule: ZeroOneSchedule,
        replica_class: Callable[[torch.Tensor], str] = lambda p: "all",
    ) -> None:
        super().__init__(adamw, comm, schedule.var_freeze_step, replica_class)
        self.schedule = schedule
        self.anchors: dict[torch.Tensor, torch.Tensor] | None = None  # A, while local steps are pending
        self.decay: dict[int, float] = {}  # per group: prod(1 - lr wd) since the anchor
        self.weight: dict[int, float] = {}  # per group: L = sum lr_t / (1 - b1^t) since the anchor
        self.kind = ""  # what the last step sent: "full", "compressed", "local" or "sync" (a settle too)

    @property
    def compressing(self) -> bool:
        """Whether the next step leaves the gradients local (all but the variance steps)."""
        return self.schedule.kind(self.steps + 1) != VARIANCE

    @property
    def pending(self) -> bool:
        """Whether local steps have moved this rank's parameters since the last synchronisation."""
        return self.anchors is not None

    @property
    def extra_bytes(self) -> int:
        """The error feedback, and the anchor while local steps are pending."""
        anchors = sum(a.numel() * a.element_size() for a in self.anchors.values()) if self.anchors else 0
        return super().extra_bytes + anchors

    def variance_updates(self) -> int:
        return self.schedule.variance_count(self.steps)

    @torch.no_grad()
    def step(self) -> None:
        t = self.steps + 1
        kind = self.schedule.kind(t)
        if t == self.schedule.var_freeze_step + 1:
            self.means = None  # the error feedback held gradients; from here it holds momenta: afresh
        if kind == VARIANCE:
            self._variance_step(t)
        elif kind == COMPRESSED:
            self._gradient_step()
        elif kind == SYNC and not self.pending:
            self._compressed_step()  # 1-bit Adam's step against the frozen variance
        else:
            self._local_step(t)
            if kind == SYNC:
                self.settle()
        self.steps, self.kind = t, kind

    def _variance_step(self, t: int) -> None:
        """AdamW on the dp-averaged gradients, v with its own count (module docstring); while every
        step so far was one, torch's AdamW step itself (bit for bit AdamW)."""
        k = self.schedule.variance_count(t)
        if k == t:
            self.adamw.step()
            return
        for group, p in self._params():
            if p.grad is None:
                continue
            state = self.adamw.state[p]
            state.pop("frozen_inverse", None)
            b1, b2 = group["betas"]
            state["step"] += 1
            state["exp_avg"].lerp_(p.grad, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denominator = (state["exp_avg_sq"] / (1 - b2**k)).sqrt_().add_(group["eps"])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - b1 ** float(state["step"])))

    def _gradient_step(self) -> None:
        """Between variance steps: the gradients' mean through the compressed all-reduce, in the
        latest variance's basis (``g / D``, each value clamped to :func:`gradient_bound`), into the
        momentum; the update is Adam's with that momentum and the variance as it stands."""
        if self.means is None:
            self.means = CompressedMeans(self.comm, self.adamw.param_groups[0]["params"][0].device)
        for key in self.classes():
            pairs = self._pairs(key)
            if not pairs:
                continue
            bound = gradient_bound(pairs[0][0]["betas"])
            flat = torch.cat([(p.grad * self._inverse(g, p)).reshape(-1) for g, p in pairs]).clamp_(-bound, bound)
            mean = self.means(key, flat) if self.comm.size > 1 else flat
            offset = 0
            for group, p in pairs:
                state, n, inverse = self.adamw.state[p], p.numel(), self._inverse(group, p)
                b1 = group["betas"][0]
                gradient = torch.where(inverse > 0, mean[offset : offset + n].view_as(p) / inverse, 0.0)
                offset += n
                state["exp_avg"].mul_(b1).add_(gradient, alpha=1 - b1)
                state["step"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                step_size = group["lr"] / (1 - b1 ** float(state["step"]))
                p.add_(state["exp_avg"] * inverse, alpha=-step_size)

    def _local_step(self, t: int) -> None:
        """This rank's own momentum and update, no communication; the first keeps the anchor."""
        if self.anchors is None:  # the parameters that take gradients (equal on every dp rank)
            self.anchors = {p: p.detach().clone() for _, p in self._params() if p.grad is not None}
            self.decay = dict.fromkeys(range(len(self.adamw.param_groups)), 1.0)
            self.weight = dict.fromkeys(range(len(self.adamw.param_groups)), 0.0)
        for index, group in enumerate(self.adamw.param_groups):
            b1 = group["betas"][0]
            decay, weight = 1 - group["lr"] * group["weight_decay"], group["lr"] / (1 - b1**t)
            self.decay[index] *= decay
            self.weight[index] = self.weight[index] * decay + weight
            bound = adam_bound(group["betas"])
            for p in group["params"]:
                if p.grad is None or p not in self.anchors:
                    continue
                state = self.adamw.state[p]
                state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                state["step"] += 1
                inverse = self._inverse(group, p)
                p.mul_(decay).add_((state["exp_avg"] * inverse).clamp_(-bound, bound), alpha=-weight)

    @torch.no_grad()
    def settle(self) -> None:
        """Average the pending local steps over dp now (collective: every dp rank calls it)."""
        if self.anchors is None:
            return
        if self.means is None:
            self.means = CompressedMeans(self.comm, self.adamw.param_groups[0]["params"][0].device)
        index_of = {id(p): i for i, group in enumerate(self.adamw.param_groups) for p in group["params"]}
        for key in self.classes():
            pairs = [(g, p) for g, p in self._params() if self.replica_class(p) == key and p in self.anchors]
            if not pairs:
                continue
            averages = []
            for _, p in pairs:
                i = index_of[id(p)]
                averages.append(((self.anchors[p] * self.decay[i] - p) / self.weight[i]).reshape(-1))
            bound = adam_bound(pairs[0][0]["betas"])
            flat = torch.cat(averages).clamp_(-bound, bound)
            mean = self.means(key, flat) if self.comm.size > 1 else flat
            offset = 0
            for group, p in pairs:
                i, n = index_of[id(p)], p.numel()
                inverse = self._inverse(group, p)
                update = mean[offset : offset + n].view_as(p) * (inverse > 0)
                offset += n
                p.copy_(self.anchors[p] * self.decay[i] - self.weight[i] * update)
                self.adamw.state[p]["exp_avg"].copy_(torch.where(inverse > 0, update / inverse, 0.0))
        self.anchors, self.kind = None, SYNC
