"""One rank's side of the pipeline: its action list, its runtime, and the cross-stage chores.

Besides running the schedule, a pipeline rank keeps the tied embedding's two copies
(first and last stage) in step by summing their gradients, shares the last stage's
loss with the other stages, and writes the measured timeline of the last step for
``loom schedule --from-run``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from loom.distributed.comm import Comm
from loom.parallel.pipeline.partition import StagePlan
from loom.parallel.pipeline.runtime import PipelineRuntime, StepTiming
from loom.parallel.pipeline.schedules import build_schedule
from loom.parallel.pipeline.simulate import TIMELINE_FILE


def add_from_peer(pp: Comm, grad: torch.Tensor, peer: int, tag: str = "tied-emb") -> None:
    """grad += the peer's grad, symmetric on both sides (non-blocking send, so no deadlock)."""
    mine = grad.detach().clone()
    handle = pp.isend(mine, peer, tag=tag)
    theirs = torch.empty_like(mine)
    pp.recv(theirs, peer, tag=tag)
    handle.wait()
    grad.add_(theirs)


class PipelineRank:
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
        tied: bool,
    ) -> None:
        self.model = model
        self.pp = pp
        self.tied_copy = tied and pp.size > 1 and model.embed != model.head
        if self.tied_copy and model.head:
            model.tok_emb.weight.pp_duplicate = True  # the first stage's copy counts in the grad norm
        self.actions = build_schedule(schedule, pp.size, microbatches, len(plans))[pp.rank]
        self.runtime = PipelineRuntime(model, plans, pp, activation_shape, torch.float32, device, autocast)
        self.last_timing: StepTiming | None = None

    def step(self, batches: list, scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run the schedule; the step's mean loss on every stage."""
        total, self.last_timing = self.runtime.step(self.actions, batches, scale)
        return total

    def share_loss(self, total: torch.Tensor) -> None:
        """The loss lives on the last stage: sum over pp gives it to all."""
        self.pp.all_reduce(total, op="sum", tag="metrics")

    def evaluate(self, batches: list) -> torch.Tensor:
        loss = self.runtime.forward_only(batches, self.pp.size, self.pp.rank)
        self.pp.all_reduce(loss, op="sum", tag="eval")
        return loss

    def sync_tied_embedding(self) -> None:
        """Sum the tied embedding's gradient over its two copies (first and last stage)."""
        if not self.tied_copy:
            return
        add_from_peer(self.pp, self.model.tok_emb.weight.grad, self.pp.size - 1 if self.model.embed else 0)

    def sync_tied_gradient(self, grad_of: Callable[[nn.Parameter], torch.Tensor]) -> None:
        """:meth:`sync_tied_embedding` for gradients kept outside ``.grad``: ``grad_of(param)``
        is this stage's local gradient (ZeRO's, before it reduces it over dp)."""
        if self.tied_copy:
            add_from_peer(self.pp, grad_of(self.model.tok_emb.weight), self.pp.size - 1 if self.model.embed else 0)

    def use_activation_dtype(self, dtype: torch.dtype) -> None:
        """Activations and their gradients cross stages in ``dtype`` (fp32 unless the model's
        parameters are 16-bit, as ZeRO's are in mixed precision)."""
        self.runtime.dtype = dtype

    def write_timeline(self, run_dir: Path) -> None:
        """Every stage's measured per-action times of the last step, gathered by pp rank 0 through files."""
        if self.last_timing is None:
            return
        part = Path(run_dir) / f".pipeline_timeline_pp{self.pp.rank}.json"
        part.write_text(json.dumps(self.last_timing.records))
        self.pp.barrier()
        if self.pp.rank == 0:
            parts = [Path(run_dir) / f".pipeline_timeline_pp{r}.json" for r in range(self.pp.size)]
            ranks = [json.loads(p.read_text()) for p in parts]
            (Path(run_dir) / TIMELINE_FILE).write_text(json.dumps({"ranks": ranks}))
            for p in parts:
                p.unlink()
