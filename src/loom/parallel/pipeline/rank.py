"""One rank's side of the pipeline: its action list, its runtime, and the cross-stage chores.

Besides running the schedule, a pipeline rank keeps the tied embedding's two copies
(first and last stage) in step by summing their gradients, evaluates (the loss shared from
the last stage), and writes the measured timeline of the last step for
``loom schedule --from-run``. The training loss reaches the other stages with the gradient
norm (``loom.parallel.grads.global_norm``'s carry), not in a collective of its own.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from loom.distributed.comm import Comm
from loom.parallel.memory import ActivationMeter
from loom.parallel.pipeline.partition import StagePlan
from loom.parallel.pipeline.runtime import PipelineRuntime, StepTiming
from loom.parallel.pipeline.schedules import build_schedule
from loom.parallel.placement import Placements
from loom.parallel.weight_grad import WeightGradStore


def add_from_peer(pp: Comm, grad: torch.Tensor, peer: int, tag: str = "tied-emb") -> None:
    """grad += the peer's grad, symmetric on both sides (non-blocking send, so no deadlock)."""
    mine = grad.detach().clone()
    handle = pp.isend(mine, peer, tag=tag)
    theirs = torch.empty_like(mine)
    pp.recv(theirs, peer, tag=tag)
    handle.wait()
    grad.add_(theirs)


class PipelineRank:
    """``placements``: the model's records, which say whether this stage holds a copy of a tied
    parameter; ``weight_grads``: the store the model's TensorParallel holds, for a schedule
    that splits the backward (zero-bubble)."""

    def __init__(
        self,
        model: nn.Module,
        plans: list[StagePlan],
        pp: Comm,
        schedule: str,
        microbatches: int,
        activation_shape: tuple[int, ...],
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
        placements: Placements,
        weight_grads: WeightGradStore | None = None,
        meter: ActivationMeter | None = None,
    ) -> None:
        self.model = model
        self.pp = pp
        # each copy of a tied parameter and the pp rank holding the other: the first stage's
        # copy (pp_owner) pairs with the last stage, and the other way round
        # (by name: ZeRO-3 materialises parameters built on the meta device after this)
        self.placements = placements
        self.tied = [
            (name, pp.size - 1 if place.pp_owner else 0) for name, _, place in placements.named() if place.tied
        ]
        self.actions = build_schedule(schedule, pp.size, microbatches, len(plans))[pp.rank]
        self.runtime = PipelineRuntime(
            model, plans, pp, activation_shape, torch.float32, device, autocast, weight_grads, meter
        )
        self.last_timing: StepTiming | None = None

    def step(self, batches: list, scale: Callable[[torch.Tensor], torch.Tensor], span=None) -> torch.Tensor:  # noqa: ANN001
        """Run the schedule; the step's mean loss on every stage (``span``: :meth:`PipelineRuntime.step`'s)."""
        total, self.last_timing = self.runtime.step(self.actions, batches, scale, span)
        return total

    def evaluate(self, batches: list) -> torch.Tensor:
        loss = self.runtime.forward_only(batches, self.pp.size, self.pp.rank)
        self.pp.all_reduce(loss, op="sum", tag="eval")
        return loss

    def sync_tied_gradients(self, grad_of: Callable[[nn.Parameter], torch.Tensor] = lambda p: p.grad) -> None:
        """Sum each tied parameter's gradient over its two copies (first and last stage).

        ``grad_of(param)`` is this stage's gradient: ``.grad``, or ZeRO's local gradient
        before it reduces it over dp."""
        for name, peer in self.tied:
            add_from_peer(self.pp, grad_of(self.placements.param(name)), peer)

    def use_activation_dtype(self, dtype: torch.dtype) -> None:
        """Activations and their gradients cross stages in ``dtype`` (fp32 unless the model's
        parameters are 16-bit, as ZeRO's are in mixed precision)."""
        self.runtime.dtype = dtype

    def write_timeline(self, path: Path) -> None:
        """Every stage's measured per-action times of the last step, gathered by pp rank 0 into
        ``path`` (JSON ``{"ranks": [records of pp rank 0, ...]}``) through one file per stage beside it."""
        if self.last_timing is None:
            return
        path = Path(path)
        parts = [path.with_name(f".{path.stem}_pp{r}{path.suffix}") for r in range(self.pp.size)]
        parts[self.pp.rank].write_text(json.dumps(self.last_timing.records))
        self.pp.barrier()
        if self.pp.rank == 0:
            path.write_text(json.dumps({"ranks": [json.loads(p.read_text()) for p in parts]}))
            for p in parts:
                p.unlink()
