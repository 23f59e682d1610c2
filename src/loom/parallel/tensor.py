"""Tensor parallelism (Megatron-LM): region mappings and column/row-parallel linears.

A tensor-parallel region is entered once and left once:

    x ──enter──> [ColumnParallelLinear ... local math ... RowParallelLinear] ──exit──> y

Without sequence parallelism activations outside the region are replicated:
``enter`` is identity forward / all-reduce backward (Megatron's *f*), ``exit`` is
all-reduce forward / identity backward (*g*). With sequence parallelism they are split
along the sequence (dim 1 of (batch, seq, hidden)): ``enter`` all-gathers forward and
reduce-scatters backward, ``exit`` reduce-scatters forward and all-gathers backward.
Either way a transformer layer moves 4 * b*s*h elements per micro-batch through the tp
group (2 forward, 2 backward), i.e. 8bsh(t-1)/t elements sent per rank under the ring
model; SP swaps each all-reduce for an all-gather + reduce-scatter of the same volume.
Under SP the column-parallel linears keep only this rank's sequence slice of their input
for backward and all-gather it again there (Megatron-LM 3): one more b*s*h all-gather per
region entry in backward, for activations 1/t of the unsplit layer's.

The column-parallel linears that read one input enter the region together
(:meth:`TensorParallel.enter_linear`): one autograd node sums their input gradients
locally and reduces the sum once, launched asynchronously so the weight gradients are
computed while it is in flight (Megatron-LM's overlap); the volume is that of ``enter``.

Every transfer goes through a :class:`loom.distributed.comm.Comm` and is counted. With a group
of size one every mapping is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loom.distributed.comm import Comm, Handle, Ledger
from loom.parallel.grad_fusion import GradFusion, WeightGradTarget, fused_linear
from loom.parallel.placement import replicated, split
from loom.parallel.weight_grad import WeightGradStore, deferrable, linear

SEQ_DIM = 1


# ----------------------------------------------------------------------------- collectives on activations


def _all_reduce(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    x = x.contiguous().clone()
    comm.all_reduce(x, op="sum", tag="tp")
    return x


def _all_gather_seq(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """(b, s/t, h) on each rank -> (b, s, h), rank order along the sequence."""
    out, handle = _gather_seq_async(x, comm)
    handle.wait()
    return torch.cat(out.unbind(0), dim=SEQ_DIM)


def _gather_seq_async(x: torch.Tensor, comm: Comm) -> tuple[torch.Tensor, Handle]:
    """Start :func:`_all_gather_seq`: (t, b, s/t, h), valid once the handle is waited."""
    x = x.contiguous()
    out = torch.empty((comm.size, *x.shape), dtype=x.dtype, device=x.device)
    return out, comm.all_gather(out.view(-1), x.view(-1), async_op=True, tag="tp-sp")


def _reduce_scatter_seq(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """(b, s, h) partial sums on each rank -> this rank's (b, s/t, h) slice of the sum."""
    out, handle = _reduce_seq_async(x, comm)
    handle.wait()
    return out


def _reduce_seq_async(x: torch.Tensor, comm: Comm) -> tuple[torch.Tensor, Handle]:
    """Start :func:`_reduce_scatter_seq`: the (b, s/t, h) output, valid once the handle is waited."""
    chunks = torch.stack(x.chunk(comm.size, dim=SEQ_DIM))
    out = torch.empty_like(chunks[0])
    return out, comm.reduce_scatter(out.view(-1), chunks.view(-1), op="sum", async_op=True, tag="tp-sp")


def _split_seq(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return x.chunk(comm.size, dim=SEQ_DIM)[comm.rank].contiguous()


class _CopyToRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.comm), None


class _ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward.

    The partial sum is reduced in place (no copy): ``exit`` takes a fresh tensor that
    nothing else reads, and ``mark_dirty`` makes autograd refuse it if something had saved it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        if not x.is_contiguous():
            return _all_reduce(x, comm)
        ctx.mark_dirty(x)
        comm.all_reduce(x, op="sum", tag="tp")
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    """SP entry: all-gather forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return _all_gather_seq(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_seq(grad, ctx.comm), None


class _ReduceScatterSequence(torch.autograd.Function):
    """SP exit: reduce-scatter forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return _reduce_scatter_seq(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_seq(grad, ctx.comm), None


class _SplitSequence(torch.autograd.Function):
    """Replicated -> sequence slice: keep this rank's chunk forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return _split_seq(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_seq(grad, ctx.comm), None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's when it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _input_grad(grads: tuple[torch.Tensor, ...], weights: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """dX = sum_i dY_i W_i: the input gradient of linears sharing one input, summed locally in ``dtype``."""
    out = torch.matmul(grads[0], weights[0]).to(dtype)
    for grad, weight in zip(grads[1:], weights[1:]):
        out.add_(torch.matmul(grad, weight))
    return out


def _weight_grads(
    grad: torch.Tensor, x: torch.Tensor, need_weight: bool, need_bias: bool, target: WeightGradTarget | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dW = dY^T X and db = sum of dY over all positions, for one linear y = x W^T + b.

    dW comes out contiguous, laid out as the weight, so autograd keeps it as ``.grad``
    without the copy its own linear backward's transposed (X^T dY)^T costs; with a ``target``
    it is computed into the weight's bucket slot instead, and None returned where it was
    (:mod:`loom.parallel.grad_fusion`).
    """
    grad2d = grad.reshape(-1, grad.shape[-1])
    weight = None
    if need_weight:
        x2d = x.reshape(-1, x.shape[-1])
        weight = grad2d.t().mm(x2d) if target is None else target.weight_grad(grad2d, x2d)
    bias = grad2d.sum(0) if need_bias else None
    return weight, bias


class _EnterLinears(torch.autograd.Function):
    """``enter`` followed by y_i = x W_i^T + b_i for every linear that reads the entered x.

    Forward: x -> replicated x (identity, or all-gather along the sequence under SP), then
    the linears. Saved for backward: x in the compute dtype, as this rank holds it (under SP
    its sequence slice, 1/t of the gathered input: Megatron-LM 3), and the weights
    themselves (a 16-bit copy of an fp32 weight is cast again in backward, not kept).
    Backward: under SP the slice's all-gather starts first; dX = sum_i dY_i W_i
    (:func:`_input_grad`) is computed meanwhile; its reduction over tp (all-reduce, or
    reduce-scatter along the sequence under SP) is started asynchronously and the weight
    gradients (:func:`_weight_grads`) are computed while it is in flight; then it is waited
    for. Gradients an autograd pass does not need are not computed. With a ``fusion`` (DDP's
    buckets) each weight that :meth:`~loom.parallel.grad_fusion.GradFusion.target` allows has
    its dW computed into its slot.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        comm: Comm,
        sequence_parallel: bool,
        n: int,
        fusion: GradFusion | None,
        *params: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        weights, biases = params[:n], params[n:]
        dtype = _compute_dtype(x)
        local = x.to(dtype)
        full = _all_gather_seq(local, comm) if sequence_parallel else local
        cast = [w.to(dtype) for w in weights]
        outs = tuple(F.linear(full, w, None if b is None else b.to(dtype)) for w, b in zip(cast, biases))
        ctx.save_for_backward(local, *weights)
        ctx.comm, ctx.sequence_parallel, ctx.n, ctx.dtype = comm, sequence_parallel, n, dtype
        ctx.dtypes = (x.dtype, [p.dtype if p is not None else None for p in params])
        ctx.targets = [None if fusion is None else fusion.target(w, dtype) for w in weights]
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        local, *weights = ctx.saved_tensors
        weights = [w.to(ctx.dtype) for w in weights]
        x_dtype, param_dtypes = ctx.dtypes
        needs = ctx.needs_input_grad[5:]
        full, gather = local, None
        if ctx.sequence_parallel and any(needs[: ctx.n]):
            full, gather = _gather_seq_async(local, ctx.comm)
        grad_x, handle = None, None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grads, weights, x_dtype)
        if gather is not None:
            gather.wait()
            full = torch.cat(full.unbind(0), dim=SEQ_DIM)
        if grad_x is not None:
            if ctx.sequence_parallel:
                grad_x, handle = _reduce_seq_async(grad_x, ctx.comm)
            else:
                handle = ctx.comm.all_reduce(grad_x, op="sum", async_op=True, tag="tp")
        param_grads: list[torch.Tensor | None] = [None] * (2 * ctx.n)
        for i, grad in enumerate(grads):
            dw, db = _weight_grads(grad, full, needs[i], needs[ctx.n + i], ctx.targets[i])
            param_grads[i] = None if dw is None else dw.to(param_dtypes[i])
            param_grads[ctx.n + i] = None if db is None else db.to(param_dtypes[ctx.n + i])
        if handle is not None:
            handle.wait()
        return (grad_x, None, None, None, None, *param_grads)


# ----------------------------------------------------------------------------- the region


class TensorParallel:
    """The tp group, whether activations outside regions are sequence-split, the store of
    zero-bubble's deferred weight gradients (``weight_grads``: None unless the pipeline's
    schedule splits the backward; see :mod:`loom.parallel.weight_grad`), and where weight
    gradients are computed into (``grad_fusion``: over DDP's buckets, set by the wiring once
    they exist, or None; see :mod:`loom.parallel.grad_fusion`)."""

    def __init__(
        self, comm: Comm, sequence_parallel: bool = False, weight_grads: WeightGradStore | None = None
    ) -> None:
        self.comm = comm
        self.sequence_parallel = sequence_parallel and comm.size > 1
        self.weight_grads = weight_grads
        self.grad_fusion: GradFusion | None = None

    @classmethod
    def single(cls, weight_grads: WeightGradStore | None = None) -> TensorParallel:
        """A tp group of one: every mapping is the identity."""
        return cls(Comm("tp", None, [0], Ledger(0)), weight_grads=weight_grads)

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, own: bool = False
    ) -> torch.Tensor:
        """``F.linear``: zero-bubble's split one while ``weight_grads`` records (a forward of F);
        else, for a layer's ``own`` weight (no other read of it in the forward: not a tied one)
        and a ``grad_fusion``, the one whose dW is computed straight into the weight's slot."""
        if own and self.grad_fusion is not None and not deferrable(self.weight_grads, weight):
            return fused_linear(x, weight, bias, self.grad_fusion)
        return linear(x, weight, bias, self.weight_grads)

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def rank(self) -> int:
        return self.comm.rank

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Into a tp region: (b, s/t, h) or replicated (b, s, h) -> replicated (b, s, h)."""
        if self.comm.size == 1:
            return x
        if self.sequence_parallel:
            return _GatherSequence.apply(x, self.comm)
        return _CopyToRegion.apply(x, self.comm)

    def enter_linear(
        self,
        x: torch.Tensor,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor | None] | None = None,
        own: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """``enter(x)``, then ``F.linear(x, w_i, b_i)`` for each column-parallel weight, as one node.

        The input gradients of all the linears are summed locally and reduced once (the same
        single b*s*h transfer as ``enter``'s), asynchronously, overlapping the weight gradients.
        ``own``: the weights are their layers' own (see :meth:`linear`).
        """
        biases = list(biases) if biases is not None else [None] * len(weights)
        if self.comm.size == 1 or deferrable(self.weight_grads, weights[0]):  # zero-bubble: each dW waits for W
            x = self.enter(x)
            return tuple(self.linear(x, w, b, own) for w, b in zip(weights, biases))
        fusion = self.grad_fusion if own and torch.is_grad_enabled() else None
        return _EnterLinears.apply(x, self.comm, self.sequence_parallel, len(weights), fusion, *weights, *biases)

    def enter_columns(self, x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
        """``enter(x)``, then each :class:`ColumnParallelLinear` of ``layers`` (see :meth:`enter_linear`).

        With a group of one the layers are simply called.
        """
        if self.comm.size == 1:
            # under autocast each layer casts x itself (and keeps its copy for backward): casting once
            # would save those copies but sum the layers' input gradients in 16 bits, not fp32
            return tuple(layer(x) for layer in layers)
        return self.enter_linear(x, [layer.weight for layer in layers], [layer.bias for layer in layers], own=True)

    def exit(self, partial: torch.Tensor) -> torch.Tensor:
        """Out of a tp region: partial sums (b, s, h) -> the sum, replicated or sequence-split."""
        if self.comm.size == 1:
            return partial
        if self.sequence_parallel:
            return _ReduceScatterSequence.apply(partial, self.comm)
        return _ReduceFromRegion.apply(partial, self.comm)

    def local_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The positions of this rank's tokens: its slice of the sequence under SP."""
        return positions.chunk(self.size)[self.rank] if self.sequence_parallel else positions

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (b, s, h) -> this rank's sequence slice when SP is on (else unchanged)."""
        if not self.sequence_parallel:
            return x
        return _SplitSequence.apply(x, self.comm)


# ----------------------------------------------------------------------------- layers


def shard_range(full: int, size: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous share of ``full`` items split ``size`` ways (``full % size == 0``)."""
    if full % size:
        raise ValueError(f"{full} is not divisible by tensor-parallel size {size}")
    part = full // size
    return slice(rank * part, (rank + 1) * part)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local, W split by output features (rows of the (out, in) weight).

    Called on an input already inside the tp region (``TensorParallel.enter``); the
    model instead enters with all the column layers that read one x together
    (``TensorParallel.enter_columns``: Q, K and V read the same gathered x), which
    overlaps the input gradient's reduction with their weight gradients. ``rows`` may
    be given explicitly for shards that are not an even split: a K/V head held by
    ``replicas`` consecutive tp ranks. ``full_out``: the real output size when
    ``out_features`` is padded to a multiple of tp (a vocabulary): the rows past it are padding.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: TensorParallel,
        bias: bool,
        rows: slice | None = None,
        replicas: int = 1,
        full_out: int | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.rows = rows or shard_range(out_features, tp.size, tp.rank)
        local = self.rows.stop - self.rows.start
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.empty(local)) if bias else None
        full = out_features if full_out is None else full_out
        self.placement = {"weight": split((full, in_features), 0, self.rows, local, tp.rank, replicas)}
        if bias:
            self.placement["bias"] = split((full,), 0, self.rows, local, tp.rank, replicas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.linear(x, self.weight, self.bias, own=True)


class RowParallelLinear(nn.Module):
    """y = exit(x_local W_local^T) + b, W split by input features (columns), b replicated.

    The bias is added after the reduction, so it is counted once, not t times; under SP
    it meets sequence-split rows, so its gradient is partial and summed over tp after backward.
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, bias: bool) -> None:
        super().__init__()
        self.tp = tp
        cols = shard_range(in_features, tp.size, tp.rank)
        self.weight = nn.Parameter(torch.empty(out_features, cols.stop - cols.start))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.placement = {"weight": split((out_features, in_features), 1, cols, cols.stop - cols.start, tp.rank)}
        if bias:
            self.placement["bias"] = replicated((out_features,), tp.size, tp.rank, tp.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.exit(self.tp.linear(x, self.weight, own=True))
        return out if self.bias is None else out + self.bias
