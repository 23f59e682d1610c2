"""Gradient-accumulation fusion: a linear's weight gradient is computed straight into its home.

Under DDP every gradient lives in a slot of a flat bucket (:mod:`loom.parallel.ddp`). Through
autograd, a linear's dW = dY^T X is a fresh tensor that AccumulateGrad makes ``.grad``, and
DDP's hook then copies it into the slot: one more pass over every weight gradient each step,
and a dW-sized tensor allocated and freed. :func:`fused_linear` (Megatron-LM's gradient
accumulation fusion, there into the bucket's ``main_grad``) has the GEMM write the slot itself
(so do the column-parallel linears entering a tp region together, :mod:`loom.parallel.tensor`,
through :class:`WeightGradTarget`):

- forward: ``F.linear(x, W, b)``, the kernel the unfused path runs; X and W are saved;
- backward: dX = dY W and db = sum over tokens of dY, as autograd's linear backward forms
  them. dW, when the engine accumulates into ``.grad`` (a backward, not ``autograd.grad``):
  the step's first (``.grad`` None) is written by ``mm(dY^T, X, out=slot)`` and the slot
  becomes ``.grad``; a later one (gradient accumulation, or a second reader of the weight) is
  formed and added in place, as AccumulateGrad adds. The weight's AccumulateGrad then receives
  no gradient from this node, yet still runs once every contribution to the weight is in: it
  adds any others (the embedding's, for a tied output head) and calls the post-accumulate-grad
  hooks once per backward, DDP's among them, as on the unfused path. Otherwise (``autograd.grad``)
  dW is returned as autograd returns it, and ``.grad`` is left alone.

Every number equals the unfused path's bit for bit: the same GEMMs on the same operand layouts
(dW as dY^T X in the weight's layout is how autograd forms it for ``x @ W^T``), the same sum.
That holds for a weight this linear alone reads, which is what the callers fuse (a layer's own
weight, :meth:`~loom.parallel.tensor.TensorParallel.linear` with ``own``). A weight with other
readers still gets the right sum, once hooked, but its terms may be grouped otherwise (the
step's earlier micro-batches, this dW and a tied embedding's gradient: (g + h) + e, not g + (h + e)).
The unfused ``F.linear`` runs instead under autocast (the weight's 16-bit copy, not the weight,
meets the GEMM), for a non-contiguous input, without grad mode, where the home has no slot of
the weight's dtype, and for a weight with a tensor hook (``register_hook``), which must be
handed dW itself (post-accumulate-grad hooks need no such care: they run as before).

Should a torch release stop calling the hooks of an AccumulateGrad that received nothing, the
bucket holding the weight would not leave during backward; the sync then sends it (correct
sums, less overlap), and ``tests/test_grad_fusion.py`` fails on it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge


class GradHome(Protocol):
    """Where parameters' gradients live (DDP's buckets)."""

    def grad_slot(self, param: torch.Tensor) -> torch.Tensor | None:
        """The parameter-shaped view its gradient lives in, or None where it has none."""


class GradFusion:
    """The fused linears' side of one :class:`GradHome`: which weights may have dW written into
    their slot, and each such weight's :class:`WeightGradTarget`, made once and kept.

    Made once because finding a weight's AccumulateGrad node (``get_gradient_edge``) was the
    dearest part of a fused linear's forward: about 45 us of Python a call, 1.1 ms of the DDP
    benchmark's 26 ms forward (24 linears). Holding the node also keeps it the weight's own: the
    weight refers to its AccumulateGrad weakly, and a node no graph and no one else holds is
    made anew by the next forward (torch's DDP reducer holds them for the same reason). Should a
    weight get another node all the same, its backward no longer runs the one kept here, and
    :meth:`WeightGradTarget.weight_grad` returns dW to autograd (the unfused result, no write).
    """

    def __init__(self, home: GradHome) -> None:
        self.home = home
        self._targets: dict[int, WeightGradTarget] = {}

    def target(self, weight: torch.Tensor, compute_dtype: torch.dtype) -> WeightGradTarget | None:
        """``weight``'s target where its dW, computed in ``compute_dtype``, may be written into
        its slot: it needs a gradient, has no tensor hook (which is owed dW itself), and has a
        slot of its dtype, which the GEMM computes in (not a 16-bit copy of it); else None."""
        if not weight.requires_grad or weight._backward_hooks or compute_dtype != weight.dtype:
            return None
        target = self._targets.get(id(weight))  # a target holds its weight: the id stays the weight's
        if target is None:
            slot = self.home.grad_slot(weight)
            if slot is None or slot.dtype != weight.dtype:
                return None
            target = self._targets[id(weight)] = WeightGradTarget(weight, self.home)
        return target


class WeightGradTarget:
    """One fused weight: the parameter itself (``saved_tensors`` hands back another object), its
    AccumulateGrad node and its home."""

    __slots__ = ("param", "node", "home")

    def __init__(self, param: torch.Tensor, home: GradHome) -> None:
        self.param, self.home = param, home
        self.node = get_gradient_edge(param).node

    def weight_grad(self, dy2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """dW = dy2^T x2 (2-D views): accumulated into ``.grad`` in its slot, returning None, when
        this backward accumulates into ``.grad``; else returned, as autograd would return it."""
        if not _accumulating(self.node):  # autograd.grad, or a backward not asked for this weight
            return dy2.t().mm(x2)
        grad = self.param.grad
        if grad is None:
            slot = self.home.grad_slot(self.param)
            torch.mm(dy2.t(), x2, out=slot)
            self.param.grad = slot
        else:
            grad.add_(dy2.t().mm(x2))
        return None


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fusion: GradFusion) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose dW lands in ``fusion``'s home, in ``weight``'s slot
    (module doc)."""
    if not (torch.is_grad_enabled() and x.is_contiguous() and x.dtype == weight.dtype):
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    target = fusion.target(weight, x.dtype)
    if target is None:
        return F.linear(x, weight, bias)
    return _LinearIntoSlot.apply(x, weight, bias, target)


class _LinearIntoSlot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, weight)
        ctx.target = target
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        dx = dy2.mm(w).view(x.shape) if ctx.needs_input_grad[0] else None
        db = dy2.sum(0) if ctx.needs_input_grad[2] else None
        dw = ctx.target.weight_grad(dy2, x2) if ctx.needs_input_grad[1] else None
        return dx, dw, db, None


def _accumulating(node: torch.autograd.graph.Node) -> bool:
    """Whether this backward runs the weight's AccumulateGrad ``node`` (it accumulates into
    ``.grad``): a backward, with no ``inputs=`` or with the weight among them. The engine
    refuses the question for a leaf under ``autograd.grad``, which never accumulates."""
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # "... currently running autograd.grad()"
        return False
