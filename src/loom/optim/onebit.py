"""1-bit Adam (Tang et al. 2021): AdamW for a warm-up, then the variance frozen and the momentum
averaged over dp through the error-compensated 1-bit all-reduce.

:class:`OneBitAdam` wraps the run's ``torch.optim.AdamW`` (its groups, hyperparameters and state):

- steps 1 .. ``freeze_step``: that AdamW's own step, on gradients the caller averaged over dp
  as usual: bit for bit AdamW;
- after: the caller leaves the gradients local (:attr:`compressing` says so). Each step, every
  parameter's momentum takes this rank's gradient, ``m = b1 m + (1 - b1) g``, and the update
  uses the variance frozen at ``freeze_step``, ``D = sqrt(v / (1 - b2^f)) + eps``:
  ``p -= lr (mean(m) / D / (1 - b1^t) + wd p)``. The mean over dp is taken by a
  :class:`~loom.distributed.compressed.CompressedAllReduce` of all parameters as one vector
  (one per tp replica class: :class:`~loom.distributed.compressed.CompressedMeans`),
  1 bit a value, in the frozen variance's basis: ``mean(m / D)``, each ``m / D`` clamped to the
  bound Adam itself obeys (:func:`adam_bound`), then ``m = mean(m / D) D``.
  D is equal on every dp rank (the warm-up's variance came from averaged gradients), so this
  is the paper's mean of the momenta in exact arithmetic; under compression each value's error
  is relative to its own update, not to its chunk's largest momenta (in m's own basis an
  element of tiny variance, e.g. the row of a token never seen, takes its chunk's scale over
  its tiny D and the run diverges: measured at dp2 x tp2). Every rank decodes the same mean,
  so the parameters stay equal across dp. Elements whose frozen variance is zero (never a
  gradient in the warm-up: a padded vocabulary row, a token not yet seen) do not move, as
  DeepSpeed's ``exp_avg_mask`` would have them, and send 0: their 1/D is 0, not 1/eps (a
  later gradient over eps alone would swamp its chunk's scale: measured, dp4 then missed
  AdamW's loss by 0.6).

The error feedback (:meth:`OneBitAdam.errors`) is part of loom's sharded checkpoints (per rank,
named by the layout: :func:`loom.parallel.pieces.onebit_key`), so a run resumed in its own
layout continues bit for bit; under another layout it starts afresh (its chunks would mean
other values), which costs at most one step's compression error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from loom.distributed.comm import Comm
from loom.distributed.compressed import CompressedMeans


def check_freeze_step(freeze_step: int) -> None:
    """The warm-up must leave a variance to freeze: at least one AdamW step."""
    if freeze_step < 1:
        raise ValueError(f"freeze_step must be at least 1 (a variance to freeze), got {freeze_step}")


def adam_bound(betas: tuple[float, float]) -> float:
    """The largest ``|m / D|`` Adam itself reaches, ``D`` the bias-corrected root of the variance.

    With ``m = (1 - b1) sum b1^k g_k`` and ``v = (1 - b2) sum b2^k g_k^2`` over the same steps,
    Cauchy-Schwarz gives ``|m| <= B sqrt(v)`` with, against the variance's long-run level ``D``,
    ``B = (1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2))`` (inf when
    ``b1^2 >= b2``; 1.17 for betas (0.9, 0.95), 7.3 for (0.9, 0.999)). After the freeze a value
    beyond B can only come from an element whose gradients outgrew the variance frozen for it
    (a rare token's row); 1-bit Adam clamps to it, because one such value sets its whole
    chunk's scale and moves every other value of the chunk by it (measured: without it the
    4-rank demo's loss jumped from 2.44 to 3.39 within 15 steps, 50 steps after the freeze).
    """
    b1, b2 = betas
    if b1 * b1 >= b2:
        return float("inf")
    return (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))


class OneBitAdam:
    """``adamw``'s warm-up, then compressed momentum over ``comm`` (module docstring).

    ``replica_class(param)``: the class of a parameter whose copies on other ranks (tp replicas)
    must stay equal; each class is compressed as a vector of its own
    (:class:`~loom.distributed.compressed.CompressedMeans`). One class by default."""

    def __init__(
        self,
        adamw: torch.optim.AdamW,
        comm: Comm,
        freeze_step: int,
        replica_class: Callable[[torch.Tensor], str] = lambda p: "all",
    ) -> None:
        check_freeze_step(freeze_step)
        self.adamw, self.comm, self.freeze_step = adamw, comm, freeze_step
        self.replica_class = replica_class
        self.steps = 0
        self.means: CompressedMeans | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups

    @property
    def state(self):  # noqa: ANN201
        return self.adamw.state

    @property
    def compressing(self) -> bool:
        """Whether the next step communicates the momentum (the gradients stay local)."""
        return self.steps >= self.freeze_step

    @property
    def extra_bytes(self) -> int:
        """What it holds beyond AdamW's state: the compressors' buffers (error feedback)."""
        return self.means.nbytes if self.means is not None else 0

    def classes(self) -> list[str]:
        """The replica classes of this rank's parameters, in the order they are compressed."""
        return sorted({self.replica_class(p) for _, p in self._params()})

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)

    def _inverse(self, group: dict, p: torch.Tensor) -> torch.Tensor:
        """1 / D, ``D = sqrt(v / (1 - b2^f)) + eps`` of the variance frozen at ``freeze_step`` (equal on
        every dp rank), and 0 where that variance is 0: such an element had no gradient in the
        warm-up and stays put; a gradient it gets later must not be divided by eps alone (it would
        swamp its chunk's scale)."""
        state = self.adamw.state[p]
        if "frozen_inverse" not in state:
            bias = 1 - group["betas"][1] ** self.variance_updates()
            denominator = (state["exp_avg_sq"] / bias).sqrt().add_(group["eps"])
            state["frozen_inverse"] = torch.where(state["exp_avg_sq"] > 0, denominator.reciprocal(), 0.0)
        return state["frozen_inverse"]

    def variance_updates(self) -> int:
        """How many steps the frozen variance averaged (its bias correction's exponent)."""
        return self.freeze_step

    def _params(self) -> list[tuple[dict, torch.Tensor]]:
        return [(group, p) for group in self.adamw.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self) -> None:
        if not self.compressing:
            self.adamw.step()
            self.steps += 1
            return
        self._compressed_step()
        self.steps += 1

    def _compressed_step(self) -> None:
        """Every class's momentum through the compressed mean, and the update with it."""
        if self.means is None:
            self.means = CompressedMeans(self.comm, self.adamw.param_groups[0]["params"][0].device)
        for key in self.classes():
            self._step_class(self._pairs(key), key)

    def _pairs(self, key: str) -> list[tuple[dict, torch.Tensor]]:
        """(group, parameter) of class ``key`` that have a gradient this step."""
        return [(g, p) for g, p in self._params() if p.grad is not None and self.replica_class(p) == key]

    def _step_class(self, pairs: list[tuple[dict, torch.Tensor]], key: str) -> None:
        """The compressed mean of one class's m / D, then its parameters' update."""
        if not pairs:
            return
        preconditioned = []
        for group, p in pairs:
            state = self.adamw.state[p]
            state["exp_avg"].mul_(group["betas"][0]).add_(p.grad, alpha=1 - group["betas"][0])
            preconditioned.append((state["exp_avg"] * self._inverse(group, p)).reshape(-1))
        bound = adam_bound(pairs[0][0]["betas"])
        flat = torch.cat(preconditioned).clamp_(-bound, bound)
        mean = self.means(key, flat) if self.comm.size > 1 else flat
        offset = 0
        for group, p in pairs:
            state = self.adamw.state[p]
            n = p.numel()
            # where the frozen variance is zero the parameter never had a gradient (a padded vocabulary
            # row): it stays put
            inverse = self._inverse(group, p)
            update = mean[offset : offset + n].view_as(p) * (inverse > 0)
            offset += n
            state["exp_avg"].copy_(torch.where(inverse > 0, update / inverse, 0.0))
            state["step"] += 1
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"] / (1 - group["betas"][0] ** float(state["step"])))

    # -- checkpoints ------------------------------------------------------------------------

    def errors(self) -> dict[str, torch.Tensor]:
        """The compressors' buffers (error feedback), per class; {} before the first compressed step."""
        return self.means.state_dict() if self.means is not None else {}

    def error_names(self) -> list[str]:
        """The names :meth:`errors` gives its buffers."""
        return CompressedMeans.names(self.classes())

    def restore_errors(self, errors: dict | None) -> None:
        """Take :meth:`errors` saved in this layout at the next compressed step (None: start afresh)."""
        self.means = CompressedMeans(self.comm, self.adamw.param_groups[0]["params"][0].device)
        self.means.load_state_dict(errors)
