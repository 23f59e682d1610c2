"""Zero-bubble's split backward: input gradients now (I), weight gradients later (W), each once.

A linear y = x W^T + b has two gradients of similar cost: dX = dY W, which the previous
pipeline stage waits for, and dW = dY^T X, which nothing waits for. Zero-bubble (ZB-H1)
runs them as two actions, I and W, and fills the pipeline's bubble with W.

- F: the runtime runs the forward inside :meth:`WeightGradStore.recording`. There
  :func:`linear` (which the column/row-parallel linears and the output head call instead of
  ``F.linear``, through their :class:`~loom.parallel.tensor.TensorParallel`, which holds the
  store) hands autograd the weight *detached*, and records the output's autograd
  edge, X and the weight. The rest of the model is untouched.
- I (:func:`backward_input`): one autograd pass from the stage output, asked for the
  gradients of the stage input, of every parameter, and of the recorded linear outputs
  (dY, captured by the engine; no Python hooks). A linear's weight is not in the graph, so
  autograd's own linear backward computes dX (and the bias gradient) but not dW; the
  norms', biases' and embeddings' gradients (cheap next to dW) come out of the same pass.
  The graph is freed at the end of I, as after any backward; X, dY and those small
  gradients wait for W. No ``.grad`` is touched.
- W (:meth:`WeightGrad.run`): dW = dY^T X for every recorded linear, then one autograd
  pass rooted at the parameters hands every gradient of the micro-batch to its
  AccumulateGrad node, as a plain backward does: ``.grad`` is accumulated, never replaced,
  and post-accumulate-grad hooks (DDP's buckets, ZeRO) fire once per parameter per
  micro-batch. Every gradient comes from the node or matmul a plain backward uses (dW as
  dY^T X, in the weight's layout; autograd forms (X^T dY)^T, the same numbers on CPU),
  so fp32 parity with the single process holds to round-off.

I + W is therefore the work of one backward (the same FLOPs), plus per linear a detach and a
record in F. Between I and W a micro-batch holds X and dY of its linears and its small
gradients, not its autograd graph.

A linear splits only while its store records (one store per rank, built for a schedule
with I/W actions and given both to the model's ``TensorParallel`` and to the pipeline runtime,
which records around F); otherwise :func:`linear` is ``F.linear``. A recomputed forward (activation
checkpointing, ``loom.model.recompute``) replays: in F the region's linears record as
usual (their X packed by the checkpoint, which frees it); when I recomputes the region,
:meth:`WeightGradStore.recompute_contexts` makes each of them split again, in the same
order, and fills its record with the recomputed X. X is then held from I to W only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge, _engine_run_backward

# ``_engine_run_backward`` is the engine entry that torch.autograd.backward/grad call after
# argument checks costing ~10 us per tensor; I and W pass ~100 tensors, already well formed.

# the (pack, unpack) of the innermost torch.autograd.graph.saved_tensors_hooks, or None
active_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks

# one recorded linear: the edge into its output's node; X as the matmul saw it, packed by
# the active saved-tensors hooks if any (X is what autograd would have saved), and their
# unpack; X's version; W
Recorded = list[tuple[GradientEdge, object, Callable | None, int, torch.Tensor]]


class WeightGradStore:
    """Records the linears of the forward passes whose weight gradients W computes."""

    def __init__(self) -> None:
        self._recording: Recorded | None = None
        self._replay: list[int] | None = None  # indices into _replay_into still to fill, in order
        self._replay_into: Recorded | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[Recorded]:
        """Inside: the linears given this store defer their dW and record into the yielded list."""
        recorded: Recorded = []
        self._recording = recorded
        try:
            yield recorded
        finally:
            self._recording = None

    def recompute_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """(forward, recomputation) contexts for one checkpointed region (``context_fn``).

        The forward notes which records the region's linears made; the recomputation makes
        the same linears split again and fills those records with the recomputed X."""
        span: dict = {}

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            recorded = self._recording
            start = len(recorded) if recorded is not None else 0
            yield
            if recorded is not None:
                span["records"], span["slots"] = recorded, list(range(start, len(recorded)))

        @contextlib.contextmanager
        def recomputation() -> Iterator[None]:
            if "records" not in span:
                yield
                return
            before = (self._replay, self._replay_into)
            self._replay, self._replay_into = list(span["slots"]), span["records"]
            try:
                yield
            finally:
                self._replay, self._replay_into = before

        return forward(), recomputation()

    def _fill(self, x: torch.Tensor) -> None:
        """The recomputed X of the next linear of the region being replayed."""
        slot = self._replay.pop(0)
        edge, _, _, _, weight = self._replay_into[slot]
        self._replay_into[slot] = (edge, x, None, x._version, weight)


def deferrable(store: WeightGradStore | None, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` splits this weight's backward (``store`` records; grad mode)."""
    active = store is not None and (store._recording is not None or store._replay is not None)
    return active and weight.requires_grad and torch.is_grad_enabled()


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, store: WeightGradStore | None = None
) -> torch.Tensor:
    """``F.linear``; while ``store`` records, the weight's dW is left to W (see the module doc).

    Under autocast X and W are cast here, so that X is recorded in the dtype dW is computed
    in, as autograd would save it.
    """
    if not (x.requires_grad and deferrable(store, weight)):
        return F.linear(x, weight, bias)
    w = weight.detach()
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, w = x.to(dtype), w.to(dtype)
    y = F.linear(x, w, bias)
    hooks = active_saved_tensors_hooks(False)
    if store._recording is None:  # a recomputation replaying a recorded region
        if hooks is not None:  # packed as in F, so the recomputation saves what the forward saved
            hooks[0](x)
        store._fill(x)
        return y
    saved, unpack = (x, None) if hooks is None else (hooks[0](x), hooks[1])
    store._recording.append((GradientEdge(y.grad_fn, y.output_nr), saved, unpack, x._version, weight))
    return y


class WeightGrad:
    """The W half of one micro-batch's backward on one chunk: the parameters' gradients
    from I, and dY with the recorded X of each linear."""

    def __init__(
        self,
        param_grads: list[tuple[torch.Tensor, torch.Tensor]],
        linears: list[tuple[torch.Tensor, object, Callable | None, int, torch.Tensor]],
    ) -> None:
        self.param_grads = param_grads
        self.linears = linears

    def run(self) -> None:
        """Accumulate every gradient of the micro-batch into ``.grad``, through autograd."""
        params = [p for p, _ in self.param_grads]
        grads = [g for _, g in self.param_grads]
        for dy, saved, unpack, version, weight in self.linears:
            x = saved if unpack is None else unpack(saved)
            if unpack is None and x._version != version:  # autograd refuses a saved tensor changed in place
                raise RuntimeError("the input of a linear was modified in place before its weight gradient (W)")
            params.append(weight)
            grads.append(dy.reshape(-1, dy.shape[-1]).t().mm(x.reshape(-1, x.shape[-1])).to(weight.dtype))
        self.param_grads, self.linears = [], []
        if params:  # roots at the parameters themselves: their AccumulateGrad nodes, hooks and all
            _engine_run_backward(
                tuple(params), tuple(grads), False, False, (), allow_unreachable=True, accumulate_grad=True
            )


def backward_input(
    output: torch.Tensor,
    grad: torch.Tensor | None,
    stage_input: torch.Tensor | None,
    params: Sequence[torch.Tensor],
    recorded: Recorded,
) -> tuple[torch.Tensor | None, WeightGrad]:
    """I: the gradient of ``stage_input`` (a leaf; None on the first stage) from ``output``
    (upstream gradient ``grad``, None for a scalar loss), and the :class:`WeightGrad` that
    finishes the backward. ``params``: every parameter the pass may reach (others are skipped)."""
    params = [p for p in params if p.requires_grad]
    first = [] if stage_input is None else [stage_input]
    inputs = (*first, *params, *(record[0] for record in recorded))
    grad = torch.ones_like(output) if grad is None else grad
    grads = _engine_run_backward(
        (output,), (grad,), False, False, inputs, allow_unreachable=True, accumulate_grad=False
    )
    param_grads = [(p, g) for p, g in zip(params, grads[len(first) :]) if g is not None]
    dys = grads[len(first) + len(params) :]
    linears = [(dy, *record[1:]) for record, dy in zip(recorded, dys) if dy is not None]
    return (grads[0] if first else None), WeightGrad(param_grads, linears)
