"""1-bit Adam (Tang et al. 2021): AdamW for a warm-up, then the variance frozen and the momentum
averaged over dp through the error-compensated 1-bit all-reduce.

:class:`OneBitAdam` wraps the run's ``torch.optim.AdamW`` (its groups, hyperparameters and state):

- steps 1 .. ``freeze_step``: that AdamW's own step, on gradients the caller averaged over dp
  as usual: bit for bit AdamW;
- after: the caller leaves the gradients local (:attr:`compressing` says so). Each step, every
  parameter's momentum takes this rank's gradient, ``m = b1 m + (1 - b1) g``, and the update
  uses the variance frozen at ``freeze_step``, ``D = sqrt(v / (1 - b2^f)) + eps``:
  ``p -= lr (mean(m) / D / (1 - b1^t) + wd p)``. The mean over dp is taken by one
  :class:`~loom.distributed.compressed.CompressedAllReduce` of all parameters as one vector,
  1 bit a value, in the frozen variance's basis: ``mean(m / D)``, then ``m = mean(m / D) D``.
  D is equal on every dp rank (the warm-up's variance came from averaged gradients), so this
  is the paper's mean of the momenta in exact arithmetic; under compression each value's error
  is relative to its own update, not to its chunk's largest momenta (in m's own basis an
  element of tiny variance, e.g. the row of a token never seen, takes its chunk's scale over
  its tiny D and the run diverges: measured at dp2 x tp2). Every rank decodes the same mean,
  so the parameters stay equal across dp. Elements whose frozen variance is zero (never a
  gradient in the warm-up: a padded vocabulary row) do not move, as DeepSpeed's
  ``exp_avg_mask`` would have them.

The error feedback is part of :meth:`state_dict`; loading it under another dp size resets it
(its chunks would mean other values), which costs at most the one step's compression error.
"""

from __future__ import annotations

import torch

from loom.distributed.comm import Comm
from loom.distributed.compressed import CompressedAllReduce


class OneBitAdam:
    """``adamw``'s warm-up, then compressed momentum over ``comm`` (module docstring)."""

    def __init__(self, adamw: torch.optim.AdamW, comm: Comm, freeze_step: int) -> None:
        if freeze_step < 1:
            raise ValueError(f"freeze_step must be at least 1 (a variance to freeze), got {freeze_step}")
        self.adamw, self.comm, self.freeze_step = adamw, comm, freeze_step
        self.steps = 0
        self.reducer: CompressedAllReduce | None = None
        self._pending_errors: dict | None = None

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)

    def _denominator(self, group: dict, p: torch.Tensor) -> torch.Tensor:
        """sqrt(v / (1 - b2^f)) + eps of the variance frozen at ``freeze_step`` (equal on every dp rank)."""
        state = self.adamw.state[p]
        if "frozen_denominator" not in state:
            bias = 1 - group["betas"][1] ** self.freeze_step
            state["frozen_denominator"] = (state["exp_avg_sq"] / bias).sqrt().add_(group["eps"])
        return state["frozen_denominator"]

    def _params(self) -> list[tuple[dict, torch.Tensor]]:
        return [(group, p) for group in self.adamw.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self) -> None:
        if not self.compressing:
            self.adamw.step()
            self.steps += 1
            return
        pairs = [(g, p) for g, p in self._params() if p.grad is not None]
        preconditioned = []
        for group, p in pairs:
            state = self.adamw.state[p]
            state["exp_avg"].mul_(group["betas"][0]).add_(p.grad, alpha=1 - group["betas"][0])
            preconditioned.append((state["exp_avg"] / self._denominator(group, p)).reshape(-1))
        flat = torch.cat(preconditioned)
        if self.reducer is None:
            self.reducer = CompressedAllReduce(flat.numel(), self.comm, flat.device)
            if self._pending_errors is not None:
                self._load_errors(self._pending_errors)
        mean = self.reducer(flat) if self.comm.size > 1 else flat
        offset = 0
        for group, p in pairs:
            state = self.adamw.state[p]
            n = p.numel()
            # where the frozen variance is zero the parameter never had a gradient (a padded vocabulary
            # row): it stays put
            update = mean[offset : offset + n].view_as(p) * (state["exp_avg_sq"] > 0)
            offset += n
            state["exp_avg"].copy_(update * self._denominator(group, p))
            state["step"] += 1
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"] / (1 - group["betas"][0] ** float(state["step"])))
        self.steps += 1

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        errors = self.reducer.state_dict() if self.reducer is not None else None
        return {"adamw": self.adamw.state_dict(), "steps": self.steps, "world": self.comm.size, "errors": errors}

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.steps = int(state["steps"])
        errors = state.get("errors")
        self._pending_errors = errors if errors is not None and state.get("world") == self.comm.size else None
        self.reducer = None

    def _load_errors(self, errors: dict) -> None:
        try:
            self.reducer.load_state_dict(errors)
        except ValueError:
            self.reducer.reset()
