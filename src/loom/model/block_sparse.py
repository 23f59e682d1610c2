"""Block-sparse attention whose cost follows the layout's non-zero blocks; no dense score matrix.

``block_sparse_attention(q, k, v, layout, block)``: q, k, v ``(batch, heads, S, d)``;
``layout`` ``(heads, S / block, S / block)`` (:mod:`loom.sparsity`). Query block i of head h
attends the key blocks ``layout[h, i]``, causally inside the diagonal block when
``causal``. Equal to dense attention under the same element mask, forward and backward.

The layout is compiled once into ``slots``: for each head and query block, the list of its
key blocks padded to the longest row (``width``). Forward walks the slots with an online
softmax (Milakov and Gimelshein, 2018; as flash attention): slot t gathers one key and value
block per query block, takes their scores, and folds them into a running maximum, sum and
output, so it holds one ``(batch, heads, S / block, block, block)`` score tile at a time and
keeps for backward only q, k, v, the output and the log-sum-exp per query. Backward
recomputes each slot's probabilities from the log-sum-exp and scatters the key and value
gradients back to their blocks (``index_add``):

    P = exp(S - lse),  dV_j += P^T dO,  dP = dO V_j^T,  dS = P (dP - rowsum(dO o O)),
    dQ += dS K_j scale,  dK_j += dS^T Q scale.

Work and memory: ``heads x S/block x width`` tiles of ``block^2`` scores, so a layout with a
fixed number of blocks per row (a window) is linear in S. Rows shorter than ``width`` pad
with an empty slot (masked), which costs the work of a full one: skewed layouts (a global
row attending everything) pay for their longest row in every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slots:
    """A layout compiled for the kernel: ``index[h, i, t]`` is the t-th key block of query block i
    of head h (0 where ``valid`` is False: padding)."""

    index: torch.Tensor  # (heads, blocks, width) long
    valid: torch.Tensor  # (heads, blocks, width) bool
    block: int

    @classmethod
    def of(cls, layout: torch.Tensor, block: int, device: torch.device | str = "cpu") -> Slots:
        layout = layout.bool()
        heads, blocks, _ = layout.shape
        counts = layout.sum(-1)
        width = int(counts.max().item())
        # stable sort puts each row's kept blocks first, in increasing order
        order = torch.sort((~layout).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        valid = torch.arange(width).view(1, 1, width) < counts.unsqueeze(-1)
        index = torch.where(valid, order, torch.zeros_like(order))
        return cls(index.to(device), valid.to(device), block)

    @property
    def width(self) -> int:
        return self.index.shape[-1]


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(batch, heads, S, d) -> (batch, heads, S / block, block, d)."""
    b, h, s, d = x.shape
    return x.view(b, h, s // block, block, d)


def _gather(x_blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Key block ``index[h, i]`` for each head h and query block i: (batch, heads, blocks, block, d)."""
    b, h, n, blk, d = x_blocks.shape
    flat = (index + torch.arange(h, device=index.device).view(h, 1) * n).reshape(-1)
    return x_blocks.reshape(b, h * n, blk, d).index_select(1, flat).view(b, h, n, blk, d)


def _mask(slots: Slots, t: int, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of slot t: -inf for padding, and the future inside a diagonal block."""
    heads, blocks, _ = slots.index.shape
    blk = slots.block
    device = slots.index.device
    ninf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    mask = torch.where(slots.valid[:, :, t], zero, ninf).view(1, heads, blocks, 1, 1)
    if causal:
        diagonal = slots.index[:, :, t] == torch.arange(blocks, device=device).view(1, blocks)
        future = torch.ones(blk, blk, dtype=torch.bool, device=device).triu(1)
        inner = torch.where(diagonal.view(heads, blocks, 1, 1) & future, ninf, zero)
        mask = mask + inner.unsqueeze(0)
    return mask


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slots: Slots, causal: bool, scale: float):  # noqa: ANN001, ANN205
        qb, kb, vb = (_blocks(t, slots.block) for t in (q, k, v))
        stats = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        shape = qb.shape[:-1]
        running_max = torch.full(shape, float("-inf"), dtype=stats, device=q.device)
        running_sum = torch.zeros(shape, dtype=stats, device=q.device)
        acc = torch.zeros(qb.shape, dtype=stats, device=q.device)
        for t in range(slots.width):
            index = slots.index[:, :, t]
            scores = (qb @ _gather(kb, index).transpose(-1, -2)).to(stats) * scale + _mask(slots, t, causal, stats)
            new_max = torch.maximum(running_max, scores.amax(-1))
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            p = torch.exp(scores - safe.unsqueeze(-1))
            correction = torch.exp(running_max - safe)
            running_sum = running_sum * correction + p.sum(-1)
            acc = acc * correction.unsqueeze(-1) + p @ _gather(vb, index).to(stats)
            running_max = new_max
        out = acc / running_sum.clamp_min(torch.finfo(stats).tiny).unsqueeze(-1)
        lse = running_max + torch.log(running_sum)
        out = out.to(q.dtype).reshape(q.shape)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.slots, ctx.causal, ctx.scale = slots, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        slots, causal, scale = ctx.slots, ctx.causal, ctx.scale
        stats = lse.dtype
        qb, kb, vb = (_blocks(t, slots.block) for t in (q, k, v))
        dob = _blocks(grad_out.contiguous(), slots.block).to(stats)
        delta = (dob * _blocks(out, slots.block).to(stats)).sum(-1)  # rowsum(dO o O)
        b, h, n, blk, d = qb.shape
        dq = torch.zeros(qb.shape, dtype=stats, device=q.device)
        dk = torch.zeros(b, h * n, blk, d, dtype=stats, device=q.device)
        dv = torch.zeros(b, h * n, blk, d, dtype=stats, device=q.device)
        heads = torch.arange(h, device=q.device).view(h, 1) * n
        for t in range(slots.width):
            index = slots.index[:, :, t]
            kj, vj = _gather(kb, index).to(stats), _gather(vb, index).to(stats)
            scores = (qb.to(stats) @ kj.transpose(-1, -2)) * scale + _mask(slots, t, causal, stats)
            p = torch.exp(scores - lse.unsqueeze(-1))  # masked entries: exp(-inf) = 0
            flat = (index + heads).reshape(-1)
            dv.index_add_(1, flat, (p.transpose(-1, -2) @ dob).reshape(b, h * n, blk, d))
            dp = dob @ vj.transpose(-1, -2)
            ds = p * (dp - delta.unsqueeze(-1)) * scale
            dq += ds @ kj
            dk.index_add_(1, flat, (ds.transpose(-1, -2) @ qb.to(stats)).reshape(b, h * n, blk, d))
        shape = q.shape
        return (
            dq.to(q.dtype).reshape(shape),
            dk.to(k.dtype).reshape(shape),
            dv.to(v.dtype).reshape(shape),
            None,
            None,
            None,
        )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: Slots,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T scale + mask) V over the blocks ``slots`` keeps: (batch, heads, S, d)."""
    if q.shape[-2] % slots.block:
        raise ValueError(f"sequence length {q.shape[-2]} is not a multiple of the block {slots.block}")
    if slots.index.shape[:2] != (q.shape[1], q.shape[-2] // slots.block):
        raise ValueError(
            f"the layout covers {tuple(slots.index.shape[:2])} (heads, blocks), the inputs "
            f"{(q.shape[1], q.shape[-2] // slots.block)}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _BlockSparse.apply(q.contiguous(), k.contiguous(), v.contiguous(), slots, causal, scale)


def dense_mask(layout: torch.Tensor, block: int, causal: bool = True) -> torch.Tensor:
    """The element mask ``(heads, S, S)`` (True: attend) a layout means: a reference for tests
    and for dense fallbacks (it is the dense matrix the kernel never builds)."""
    mask = layout.bool().repeat_interleave(block, 1).repeat_interleave(block, 2)
    if causal:
        s = mask.shape[-1]
        mask = mask & torch.ones(s, s, dtype=torch.bool).tril()
    return mask
