"""Executes one pipeline rank's action list for an optimizer step.

The schedule (``schedules.py``) says what to do and in which order; this file does it:

- F: run the chunk on the micro-batch's tokens (first stage) or the received activation;
  on the last stage the output is the loss divided by the number of micro-batches, so
  the summed gradient equals the single process's over the same micro-batches.
- B: backward from the loss (last stage) or from the received output gradient.
- I / W (zero-bubble): input gradient first (so the previous stage can go on), weight
  gradient later. W walks the retained graph again restricted to the parameters.
- SEND_*: posted without blocking (isend) and waited at the end of the step; RECV_*:
  block until the data is there. Shapes are known up front, so there is no handshake.
  With non-blocking sends a schedule that is a valid order of its dependencies cannot
  deadlock, and nothing relies on ``batch_isend_irecv``.

A micro-batch's activations are freed as soon as its backward (or W) is done. Every
compute action is timed, so the step reports busy and idle time per rank.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from loom.dist.comm import Comm, Handle
from loom.parallel.pipeline.partition import StagePlan
from loom.parallel.pipeline.schedules import Action

COMPUTE = ("F", "B", "I", "W")


@dataclass
class StepTiming:
    busy_s: float = 0.0
    wall_s: float = 0.0
    records: list[dict] = field(default_factory=list)

    @property
    def bubble(self) -> float:
        """Idle over busy time of this rank: (wall - busy) / busy."""
        return (self.wall_s - self.busy_s) / self.busy_s if self.busy_s else 0.0


class PipelineRuntime:
    """One rank's side of the pipeline: ``model`` holds the layers of all its ``plans`` (chunks)."""

    def __init__(
        self,
        model: nn.Module,
        plans: list[StagePlan],
        comm: Comm,
        activation_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.model = model
        self.plans = plans
        self.chunk_params = [model.stage_parameters(p.layers, p.embed, p.head) for p in plans]
        self.comm = comm
        self.activation_shape = activation_shape
        self.dtype = dtype
        self.device = device
        self.autocast = autocast

    def step(
        self,
        actions: list[Action],
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    ) -> tuple[torch.Tensor, StepTiming]:
        """Run ``actions``; returns (sum over micro-batches of loss / m on the last stage, else 0; timing)."""
        m = len(batches)
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        out_grads: dict[tuple[int, int], torch.Tensor] = {}
        sends: list[tuple[Handle, torch.Tensor]] = []
        total = torch.zeros((), device=self.device)
        timing = StepTiming()
        began = time.perf_counter()
        for action in actions:
            key = (action.microbatch, action.chunk)
            plan = self.plans[action.chunk]
            start = time.perf_counter()
            if action.kind == "F":
                x, y = batches[action.microbatch]
                with self.autocast():
                    out = self.model.run_stage(x if plan.embed else inputs[key], plan.layers, plan.embed, plan.head)
                    if plan.head:
                        out = self.model.loss_from_logits(out, y) / m
                if plan.head:
                    total += out.detach().float()
                outputs[key] = out
            elif action.kind == "B":
                self._backward(outputs.pop(key), out_grads.pop(key, None), plan, scale)
            elif action.kind == "I":
                if not plan.embed:  # the first stage has no input gradient to send
                    out = outputs[key]
                    grad = out_grads.get(key)
                    torch.autograd.backward(scale(out) if plan.head else out, grad, inputs=[inputs[key]],
                                            retain_graph=True)
            elif action.kind == "W":
                out = outputs.pop(key)
                torch.autograd.backward(scale(out) if plan.head else out, out_grads.pop(key, None),
                                        inputs=self.chunk_params[action.chunk])
            elif action.kind == "SEND_ACT":
                tensor = outputs[key].detach().contiguous()
                sends.append((self.comm.isend(tensor, action.peer, tag="pp-act"), tensor))
            elif action.kind == "RECV_ACT":
                buffer = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
                self.comm.recv(buffer, action.peer, tag="pp-act")
                inputs[key] = buffer.requires_grad_()
            elif action.kind == "SEND_GRAD":
                grad = inputs.pop(key).grad.contiguous()
                sends.append((self.comm.isend(grad, action.peer, tag="pp-grad"), grad))
            elif action.kind == "RECV_GRAD":
                buffer = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
                self.comm.recv(buffer, action.peer, tag="pp-grad")
                out_grads[key] = buffer
            else:
                raise ValueError(f"unknown pipeline action {action}")
            if action.kind in COMPUTE:
                end = time.perf_counter()
                timing.busy_s += end - start
                # wall-clock times, so the records of all ranks share one clock for the chart
                now = time.time()
                timing.records.append({"kind": action.kind, "microbatch": action.microbatch, "chunk": action.chunk,
                                       "start": now - (end - start), "end": now})
        for handle, _ in sends:
            handle.wait()
        timing.wall_s = time.perf_counter() - began
        return total, timing

    def _backward(self, out: torch.Tensor, grad: torch.Tensor | None, plan: StagePlan,
                  scale: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if plan.head:
            scale(out).backward()
        else:
            out.backward(grad)

    @torch.no_grad()
    def forward_only(self, batches: list[tuple[torch.Tensor, torch.Tensor]], pp: int, pp_rank: int) -> torch.Tensor:
        """Evaluation: every micro-batch through every chunk; the mean loss on the last stage (else 0)."""
        stages = pp * len(self.plans)
        total = torch.zeros((), device=self.device)
        sends: list[tuple[Handle, torch.Tensor]] = []
        for x, y in batches:
            for c, plan in enumerate(self.plans):
                s = c * pp + pp_rank
                if plan.embed:
                    h = x
                else:
                    h = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
                    self.comm.recv(h, (s - 1) % pp, tag="pp-eval")
                with self.autocast():
                    out = self.model.run_stage(h, plan.layers, plan.embed, plan.head)
                    if plan.head:
                        total += self.model.loss_from_logits(out, y).float()
                if s < stages - 1:
                    out = out.contiguous()
                    sends.append((self.comm.isend(out, (s + 1) % pp, tag="pp-eval"), out))
        for handle, _ in sends:
            handle.wait()
        return total / len(batches)
