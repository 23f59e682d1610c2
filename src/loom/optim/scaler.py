"""Dynamic loss scaling for fp16: scale the loss up, skip steps whose gradients overflow.

fp16 gradients underflow below ~6e-8, so the loss is multiplied by ``scale`` before
backward and the gradients divided by it before the update. When any gradient on any
rank of any of the given groups is inf or NaN, *every* rank skips the step (one all-reduce
of a 0/1 flag, op max, per group, so the ranks agree) and the scale is multiplied by
``backoff_factor``; after ``growth_interval`` consecutive clean steps it is multiplied by
``growth_factor``. Same policy as torch.amp.GradScaler, but collective-aware and usable
on flat gradient shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from loom.distributed.comm import Comm


class DynamicLossScaler:
    """``comms``: the groups whose ranks must agree on skipping (dp, and tp/pp when used)."""

    def __init__(
        self,
        comms: Sequence[Comm] = (),
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
    ) -> None:
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval >= 1):
            raise ValueError("need growth_factor > 1, 0 < backoff_factor < 1 and growth_interval >= 1")
        self.comms = list(comms)
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.clean_steps = 0
        self.skipped_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def found_overflow(self, grads: Iterable[torch.Tensor]) -> bool:
        """Whether any of ``grads`` here, or on any rank of the groups, is inf or NaN."""
        grads = list(grads)
        device = grads[0].device if grads else torch.device("cpu")
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        for g in grads:
            if g.numel() and not torch.isfinite(g).all():
                flag.fill_(1.0)
                break
        for comm in self.comms:
            comm.all_reduce(flag, op="max", tag="loss-scale")
        return bool(flag.item())

    def update(self, overflow: bool) -> None:
        """After a step: back off on overflow, grow after a clean window."""
        if overflow:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def grad_scaler_state(self) -> dict:
        """The state in ``torch.amp.GradScaler``'s layout (what the trainer's checkpoints hold)."""
        return {
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": self.clean_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Either layout: this class's, or ``torch.amp.GradScaler``'s (``_growth_tracker``)."""
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"] if "clean_steps" in state else state["_growth_tracker"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
