"""Block-sparse attention through loom's compiled CPU kernel (``loom/native/block_sparse.cpp``).

The same attention as :mod:`loom.model.block_sparse` (softmax(Q K^T scale + mask) V over the
layout's blocks, causal inside the diagonal block), computed one query block at a time in C++:
the block's kept key blocks, as runs of consecutive blocks read in place, give a score tile that
stays in the thread's cache through the matmul, the mask, the softmax and the product with V
(the torch-ops kernel passes over each tile with a separate op, each from memory at 8k-16k
tokens). Backward keeps only q, k, v, the output and the log-sum-exp per query (as flash
attention) and recomputes each block's probabilities:

    P = exp(S - lse),  dP = dO V^T,  dS = P o (dP - rowsum(dO o O)),
    dQ = dS K scale,   dK = dS^T Q scale,   dV = P^T dO.

Work follows the kept blocks exactly (no padded slots, no window tiles); memory for backward is
linear in the sequence whatever the layout. fp32 inside: 16-bit inputs are computed in fp32
(scores and statistics, as the torch-ops kernel) and their results cast back. Threads: torch's
intra-op count (``torch.get_num_threads()``), in the process's OpenMP runtime.

Layouts: the kernel reads every array through its strides (``(batch, heads, S, d)``, d
contiguous), so the model's q, k and v, views of its projections that are ``(batch, S, heads,
d)`` in memory, are read in place, not copied. The output is allocated in q's layout and each
gradient in its input's (a dense tensor with the input's order of strides): in the model that is
``(batch, S, heads, d)``, so ``out.transpose(1, 2).reshape(batch, S, -1)`` is a free view and the
gradients reach the projections without a copy; given ``(batch, heads, S, d)`` tensors, the
outputs are laid out so too (measured at 8k tokens, mixed layouts cost 3 ms of 59). Outputs
are faulted in at once, on huge pages and split between the kernel's threads, where they are
fresh mappings (:func:`loom.parallel.host_allocator.fresh_pages`).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from loom import native
from loom.parallel.host_allocator import fresh_pages

KERNEL = "block_sparse"


@dataclass(frozen=True)
class KeptBlocks:
    """A layout compiled for the C++ kernel: ``cols[h, i]`` the key blocks query block i of head h
    attends, ascending (its own block always among them), -1 after the last; ``(heads, blocks,
    width)`` int32, width the longest row's count."""

    cols: torch.Tensor
    block: int

    @classmethod
    def of(cls, layout: torch.Tensor, block: int) -> KeptBlocks:
        n = layout.shape[-1]
        kept = layout.bool().cpu() | torch.eye(n, dtype=torch.bool)
        width = int(kept.sum(-1).max())
        ascending = torch.where(kept, torch.arange(n), n).sort(-1).values[..., :width]
        return cls(torch.where(ascending < n, ascending, -1).to(torch.int32).contiguous(), block)


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernel reads it: fp32, its last dimension contiguous and its rows apart (a
    token stride of at least d, as BLAS requires of a leading dimension), copied only where it is
    not (a gradient expanded from fewer tokens has a token stride of 0)."""
    t = t.float()
    return t if t.stride(-1) == 1 and t.stride(-2) >= t.shape[-1] else t.contiguous()


def _strides(*tensors: torch.Tensor) -> ctypes.Array:
    """(batch, head, token) strides of each (batch, heads, S, d) tensor, in elements, as int64."""
    flat = [stride for t in tensors for stride in t.stride()[:3]]
    return (ctypes.c_int64 * len(flat))(*flat)


def _dense_like(t: torch.Tensor, fresh: list[int]) -> torch.Tensor:
    """A new fp32 (batch, heads, S, d) tensor of ``t``'s shape, dense, d contiguous and the other
    dimensions in memory in the order of ``t``'s strides (``t``'s own strides where ``t`` is dense
    with d contiguous): a gradient laid out as its input. Its page range joins ``fresh`` where it
    is a fresh mapping (:func:`loom.parallel.host_allocator.fresh_pages`), for the kernel's
    threads to fault in at once."""
    order = [*sorted(range(3), key=lambda i: -t.stride(i)), 3]  # outermost first; ties keep their order
    new = torch.empty([t.shape[i] for i in order], dtype=torch.float32)
    fresh.extend(fresh_pages(new) or ())
    return new.permute([order.index(i) for i in range(4)])


def _ranges(fresh: list[int]) -> tuple[ctypes.Array, int]:
    """``fresh``'s [start, end) pairs as the kernel takes them: an int64 array and its pair count."""
    return (ctypes.c_int64 * max(1, len(fresh)))(*fresh), len(fresh) // 2


class _CppBlockSparse(torch.autograd.Function):
    """Its own dtypes under autocast: fp32 inside, the inputs' dtype out."""

    @staticmethod
    def forward(ctx, q, k, v, kept: KeptBlocks, causal: bool, scale: float):  # noqa: ANN001, ANN205
        with torch.autocast("cpu", enabled=False):
            b, h, s, d = q.shape
            qf, kf, vf = (_readable(t) for t in (q, k, v))
            fresh = []
            out = _dense_like(q, fresh)
            lse = torch.empty(b, h, s, dtype=torch.float32)
            native.library(KERNEL).loom_block_sparse_forward(
                *map(_pointer, (qf, kf, vf, kept.cols)),
                _strides(qf, kf, vf, out),
                ctypes.c_int64(b * h),
                h,
                s // kept.block,
                kept.cols.shape[-1],
                kept.block,
                d,
                ctypes.c_float(scale),
                int(causal),
                torch.get_num_threads(),
                _pointer(out),
                _pointer(lse),
                *_ranges(fresh),
            )
            out = out.to(q.dtype)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.kept, ctx.causal, ctx.scale = kept, causal, scale
            return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        with torch.autocast("cpu", enabled=False):
            q, k, v, out, lse = ctx.saved_tensors
            kept = ctx.kept
            b, h, s, d = q.shape
            qf, kf, vf, of, gf = (_readable(t) for t in (q, k, v, out, grad_out))
            fresh = []
            dq, dk, dv = (_dense_like(t, fresh) for t in (q, k, v))
            native.library(KERNEL).loom_block_sparse_backward(
                *map(_pointer, (qf, kf, vf, of, lse, gf, kept.cols)),
                _strides(qf, kf, vf, of, gf, dq, dk, dv),
                ctypes.c_int64(b * h),
                h,
                s // kept.block,
                kept.cols.shape[-1],
                kept.block,
                d,
                ctypes.c_float(ctx.scale),
                int(ctx.causal),
                torch.get_num_threads(),
                *map(_pointer, (dq, dk, dv)),
                *_ranges(fresh),
            )
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def cpp_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kept: KeptBlocks,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T scale + mask) V over the blocks ``kept`` keeps: (batch, heads, S, d) CPU
    tensors, S a multiple of the block. Raises :class:`loom.native.NativeUnavailable` where the
    kernel cannot be built here."""
    if q.device.type != "cpu":
        raise ValueError(f"the C++ block-sparse kernel runs on CPU tensors, not {q.device.type}")
    heads, blocks = kept.cols.shape[:2]
    if q.shape[-2] != blocks * kept.block or q.shape[1] != heads:
        raise ValueError(
            f"the layout covers {heads} heads x {blocks} blocks of {kept.block}, the inputs "
            f"{q.shape[1]} heads x {q.shape[-2]} tokens"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _CppBlockSparse.apply(q, k, v, kept, causal, scale)
