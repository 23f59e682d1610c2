"""Executes one pipeline rank's action list for an optimizer step.

The schedule (``schedules.py``) says what to do and in which order; this file does it:

- F: run the chunk on the micro-batch's tokens (first stage) or the received activation;
  on the last stage the output is the loss divided by the number of micro-batches, so
  the summed gradient equals the single process's over the same micro-batches.
- B: backward from the loss (last stage) or from the received output gradient.
- I / W (zero-bubble): input gradient first (so the previous stage can go on), weight
  gradient later, each computed once (``weight_grad.py``): F records the linears, I is
  the backward without their dW = dY^T X, W computes those and hands every gradient of
  the micro-batch to ``.grad``. The first stage sends no input gradient, so nothing
  waits for its I: there I does nothing and W is the whole (unsplit) backward.
- SEND_*: posted without blocking (isend) and waited at the end of the step; RECV_*:
  block until the data is there, the receive having been posted a couple of receives
  ahead on gloo (:class:`_Receives`). Shapes are known up front, so there is no handshake.
  With non-blocking sends a schedule that is a valid order of its dependencies cannot
  deadlock, and nothing relies on ``batch_isend_irecv``.

A micro-batch's activations are freed as soon as its backward (or I) is done. Every
compute action is timed, so the step reports busy and idle time per rank.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from loom.distributed.comm import Comm, Handle
from loom.parallel.memory import ActivationMeter
from loom.parallel.pipeline.partition import StagePlan
from loom.parallel.pipeline.schedules import Action
from loom.parallel.weight_grad import Recorded, WeightGrad, WeightGradStore, backward_input

COMPUTE = ("F", "B", "I", "W")
RECEIVES = {"RECV_ACT": "pp-act", "RECV_GRAD": "pp-grad"}  # kind -> ledger tag
RECEIVE_AHEAD = 2  # receives posted before the one being waited for (gloo only, see _Receives)


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
        weight_grads: WeightGradStore | None = None,
        meter: ActivationMeter | None = None,
    ) -> None:
        self.model = model
        self.plans = plans
        self.comm = comm
        self.activation_shape = activation_shape
        self.dtype = dtype
        self.device = device
        self.autocast = autocast
        self.weight_grads = weight_grads  # the store the model's TensorParallel holds (split backwards)
        self.meter = meter or ActivationMeter()  # a micro-batch's saved tensors live from its F to its B (or W)
        gloo = dist.is_available() and dist.is_initialized() and dist.get_backend(comm.group) == "gloo"
        self.receive_ahead = RECEIVE_AHEAD if gloo else 0

    def step(
        self,
        actions: list[Action],
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
        span: Callable[[str], contextlib.AbstractContextManager] | None = None,
    ) -> tuple[torch.Tensor, StepTiming]:
        """Run ``actions``; returns (sum over micro-batches of loss / m on the last stage, else 0; timing).
        ``span(name)``: a named range around each action (``"loom.pp.F mb0 chunk0"``; the trainer's
        profiler gives one while it records)."""
        split_backward = any(action.kind == "I" for action in actions)
        if split_backward:
            if any(action.kind == "B" for action in actions):  # a split forward's B would miss the linears' dW
                raise ValueError("a pipeline schedule mixes whole backwards (B) with split ones (I, W)")
            if self.weight_grads is None:
                raise ValueError(
                    "a schedule with split backwards (I, W) needs the WeightGradStore that the "
                    "model's TensorParallel was built with (weight_grads)"
                )
        params = [p for p in self.model.parameters() if p.requires_grad] if split_backward else []
        m = len(batches)
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        out_grads: dict[tuple[int, int], torch.Tensor] = {}
        recorded: dict[tuple[int, int], Recorded] = {}  # F's linears, for I
        weight_grads: dict[tuple[int, int], WeightGrad] = {}  # I's leftovers, for W
        sends: list[tuple[Handle, torch.Tensor]] = []
        total = torch.zeros((), device=self.device)
        timing = StepTiming()
        began = time.perf_counter()
        receives = _Receives(actions, self.comm, self._buffer, self.receive_ahead)
        for action in actions:
            key = (action.microbatch, action.chunk)
            plan = self.plans[action.chunk]
            start = time.perf_counter()
            name = f"loom.pp.{action.kind} mb{action.microbatch} chunk{action.chunk}" if span else ""
            with span(name) if span else contextlib.nullcontext():
                if action.kind == "F":
                    x, y = batches[action.microbatch]
                    if self.model.rng is not None:  # dropout draws this micro-batch's masks, whenever it runs
                        self.model.rng.microbatch(action.microbatch)
                    split = split_backward and not plan.embed
                    record = self.weight_grads.recording() if split else contextlib.nullcontext()
                    with (
                        self.autocast(),
                        record as recorded[key],
                        self.meter.forward(key, alike=("chunk", action.chunk)),
                    ):
                        out = self.model.run_stage(x if plan.embed else inputs[key], plan.layers, plan.embed, plan.head)
                        if plan.head:
                            out = self.model.loss_from_logits(out, y) / m
                    if plan.head:
                        total += out.detach().float()
                    outputs[key] = out
                elif action.kind == "B":
                    self._backward(outputs.pop(key), out_grads.pop(key, None), plan, scale)
                    self.meter.release(key)
                elif action.kind == "I":
                    if not plan.embed:  # the first stage has no input gradient to send: its W is the whole backward
                        x = inputs[key]
                        out = outputs.pop(key)
                        x.grad, weight_grads[key] = backward_input(
                            scale(out) if plan.head else out, out_grads.pop(key, None), x, params, recorded.pop(key)
                        )
                elif action.kind == "W":
                    if plan.embed:
                        self._backward(outputs.pop(key), out_grads.pop(key, None), plan, scale)
                    else:
                        weight_grads.pop(key).run()
                    self.meter.release(key)
                elif action.kind == "SEND_ACT":
                    tensor = outputs[key].detach().contiguous()
                    sends.append((self.comm.isend(tensor, action.peer, tag="pp-act"), tensor))
                elif action.kind == "RECV_ACT":
                    inputs[key] = receives.take(action).requires_grad_()
                elif action.kind == "SEND_GRAD":
                    grad = inputs.pop(key).grad.contiguous()
                    sends.append((self.comm.isend(grad, action.peer, tag="pp-grad"), grad))
                elif action.kind == "RECV_GRAD":
                    out_grads[key] = receives.take(action)
                else:
                    raise ValueError(f"unknown pipeline action {action}")
            if action.kind in COMPUTE:
                end = time.perf_counter()
                timing.busy_s += end - start
                # wall-clock times, so the records of all ranks share one clock for the chart
                now = time.time()
                timing.records.append(
                    {
                        "kind": action.kind,
                        "microbatch": action.microbatch,
                        "chunk": action.chunk,
                        "start": now - (end - start),
                        "end": now,
                    }
                )
        for handle, _ in sends:
            handle.wait()
        timing.wall_s = time.perf_counter() - began
        return total, timing

    def _buffer(self) -> torch.Tensor:
        return torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)

    def _backward(
        self,
        out: torch.Tensor,
        grad: torch.Tensor | None,
        plan: StagePlan,
        scale: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
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


class _Receives:
    """A step's receives in action order, each posted ``ahead`` receives before its own action.

    gloo moves a message once both sides have posted it: a receive posted only at its action
    pays a round trip through the sender's transport thread (~0.3 ms, and ms on a busy
    machine) even when the data was sent long before; posted ahead, the data lands while
    this rank computes. Not with NCCL (``ahead`` 0): it runs a peer pair's sends and
    receives in one stream in call order, so a receive posted before a send that the peer
    is waiting for would deadlock. The order of posting is the order of the actions, so
    messages match as with blocking receives.
    """

    def __init__(self, actions: list[Action], comm: Comm, buffer: Callable[[], torch.Tensor], ahead: int) -> None:
        self.todo = deque(a for a in actions if a.kind in RECEIVES)
        self.posted: deque[tuple[Action, Handle, torch.Tensor]] = deque()
        self.comm, self.buffer, self.ahead = comm, buffer, ahead
        self._post(ahead)

    def _post(self, n: int) -> None:
        while len(self.posted) < n and self.todo:
            action = self.todo.popleft()
            buffer = self.buffer()
            self.posted.append((action, self.comm.irecv(buffer, action.peer, tag=RECEIVES[action.kind]), buffer))

    def take(self, action: Action) -> torch.Tensor:
        """Wait for ``action``'s data (posting the next receives first)."""
        self._post(1 + self.ahead)
        posted, handle, buffer = self.posted.popleft()
        if posted is not action:
            raise RuntimeError(f"pipeline receive out of order: {action} while {posted} was next")
        handle.wait()
        return buffer
