"""Block-sparse attention whose cost follows the layout's non-zero blocks; no dense score matrix.

``block_sparse_attention(q, k, v, layout, block)``: q, k, v ``(batch, heads, S, d)``;
``layout`` ``(heads, S / block, S / block)`` (:mod:`loom.sparsity`). Query block i of head h
attends the key blocks ``layout[h, i]``, causally inside the diagonal block when
``causal``. Equal to dense attention under the same element mask, forward and backward.

The layout is compiled once into ``slots``: for each head and query block, the list of its
key blocks (its own first) padded to the longest row (``width``). Forward walks the slots a
chunk at a time (about ``CHUNK_COLUMNS`` keys) with an online softmax (Milakov and
Gimelshein, 2018; as flash attention): a chunk gathers g key and value blocks per query
block, takes their scores in one batched matmul, and folds them into a running maximum, sum
and output, so it holds one ``(batch, heads, S / block, block, g x block)`` score tile at a
time and keeps for backward only q, k, v, the output and the log-sum-exp per query.
Backward recomputes each chunk's probabilities from the log-sum-exp and scatters the key and
value gradients back to their blocks (``index_add``):

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

CHUNK_COLUMNS = 512  # key columns per score tile: slots are taken this many keys at a time


@dataclass(frozen=True)
class Slots:
    """A layout compiled for the kernel: ``index[h, i, t]`` is the t-th key block of query block i
    of head h (0 where ``valid`` is False: padding). Each row's own (diagonal) block comes first,
    so the causal mask inside it is one fixed triangle in the first slot of every row."""

    index: torch.Tensor  # (heads, blocks, width) long
    valid: torch.Tensor  # (heads, blocks, width) bool
    block: int

    @classmethod
    def of(cls, layout: torch.Tensor, block: int, device: torch.device | str = "cpu") -> Slots:
        layout = layout.bool() | torch.eye(layout.shape[-1], dtype=torch.bool)  # every block sees itself
        heads, blocks, _ = layout.shape
        counts = layout.sum(-1)
        width = int(counts.max().item())
        columns = torch.arange(blocks)
        rank = torch.where(columns.view(1, blocks) == columns.view(blocks, 1), -1, columns.view(1, blocks))
        rank = torch.where(layout, rank, blocks)  # the diagonal, then kept blocks in order, then the rest
        order = torch.sort(rank, dim=-1, stable=True).indices[..., :width]
        valid = torch.arange(width).view(1, 1, width) < counts.unsqueeze(-1)
        index = torch.where(valid, order, torch.zeros_like(order))
        return cls(index.to(device), valid.to(device), block)

    @property
    def width(self) -> int:
        return self.index.shape[-1]

    def chunks(self) -> list[slice]:
        """Consecutive slots taken together: about ``CHUNK_COLUMNS`` key columns a tile."""
        step = max(1, min(self.width, CHUNK_COLUMNS // self.block))
        return [slice(t, min(t + step, self.width)) for t in range(0, self.width, step)]


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(batch, heads, S, d) -> (batch, heads, S / block, block, d)."""
    b, h, s, d = x.shape
    return x.view(b, h, s // block, block, d)


def _flat(index: torch.Tensor, blocks: int) -> torch.Tensor:
    """Per-head block indices (heads, rows, g) -> rows of a (heads x blocks) stack, flattened."""
    heads = index.shape[0]
    return (index + torch.arange(heads, device=index.device).view(heads, 1, 1) * blocks).reshape(-1)


class _Gather:
    """Gathers key/value blocks into one reused buffer: a fresh multi-MB tensor per chunk costs
    more in page faults than the copy itself."""

    def __init__(self, x_blocks: torch.Tensor, width: int, dtype: torch.dtype) -> None:
        b, h, n, blk, d = x_blocks.shape
        self.rows = x_blocks.reshape(b, h * n, blk, d)
        self.shape = (b, h, n, blk, d)
        self.buffer = torch.empty(b * h * n * width * blk * d, dtype=x_blocks.dtype, device=x_blocks.device)
        self.dtype = dtype

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Key blocks ``index[h, i, :]`` for each head h and query block i, side by side:
        (batch, heads, blocks, g x block, d)."""
        b, h, n, blk, d = self.shape
        g = index.shape[-1]
        out = self.buffer[: b * h * n * g * blk * d].view(b, h * n * g, blk, d)
        torch.index_select(self.rows, 1, _flat(index, n), out=out)
        return out.view(b, h, n, g * blk, d).to(self.dtype)


def _apply_mask(scores: torch.Tensor, slots: Slots, chunk: slice, causal: bool) -> torch.Tensor:
    """In place on a chunk's (batch, heads, blocks, block, g x block) scores: -inf for padding
    slots, and for the future inside each row's own block (slot 0's first ``block`` columns)."""
    heads, blocks, _ = slots.index.shape
    blk = slots.block
    valid = slots.valid[:, :, chunk]
    if not bool(valid.all()):
        ninf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
        padding = torch.where(valid, 0.0, ninf).to(scores.dtype).repeat_interleave(blk, -1)
        scores.add_(padding.view(1, heads, blocks, 1, -1))
    if causal and chunk.start == 0:
        future = torch.ones(blk, blk, dtype=torch.bool, device=scores.device).triu(1)
        scores[..., :blk].masked_fill_(future, float("-inf"))
    return scores


def _bmm(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., m, k) and (..., k, n) as 3-d batches of matmuls (views, no copies where contiguous)."""
    return a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slots: Slots, causal: bool, scale: float):  # noqa: ANN001, ANN205
        stats = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qb = _blocks(q, slots.block).to(stats) * scale
        b, h, n, blk, d = qb.shape
        chunks = slots.chunks()
        widest = max(c.stop - c.start for c in chunks)
        keys, values = _Gather(_blocks(k, blk), widest, stats), _Gather(_blocks(v, blk), widest, stats)
        tile = torch.empty(b * h * n * blk * widest * blk, dtype=stats, device=q.device)
        running_max = torch.full((b, h, n, blk), float("-inf"), dtype=stats, device=q.device)
        running_sum = torch.zeros((b, h, n, blk), dtype=stats, device=q.device)
        acc = torch.zeros(qb.shape, dtype=stats, device=q.device)
        for chunk in chunks:
            index = slots.index[:, :, chunk]
            cols = index.shape[-1] * blk
            scores = tile[: b * h * n * blk * cols].view(b, h, n, blk, cols)
            torch.matmul(qb, keys(index).transpose(-1, -2), out=scores)
            _apply_mask(scores, slots, chunk, causal)
            new_max = torch.maximum(running_max, scores.amax(-1))
            p = scores.sub_(new_max.unsqueeze(-1)).exp_()  # in place: the first chunk holds each row's own block
            correction = torch.exp(running_max - new_max)
            running_sum.mul_(correction).add_(p.sum(-1))
            acc.mul_(correction.unsqueeze(-1))
            acc.view(-1, blk, d).baddbmm_(*_bmm(p, values(index)))
            running_max = new_max
        out = (acc / running_sum.unsqueeze(-1)).to(q.dtype).reshape(q.shape)
        lse = running_max + torch.log(running_sum)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.slots, ctx.causal, ctx.scale = slots, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        slots, causal, scale = ctx.slots, ctx.causal, ctx.scale
        stats = lse.dtype
        qb = _blocks(q, slots.block).to(stats) * scale
        b, h, n, blk, d = qb.shape
        chunks = slots.chunks()
        widest = max(c.stop - c.start for c in chunks)
        keys, values = _Gather(_blocks(k, blk), widest, stats), _Gather(_blocks(v, blk), widest, stats)
        dob = _blocks(grad_out.contiguous(), blk).to(stats)
        delta = (dob * _blocks(out, blk).to(stats)).sum(-1, keepdim=True)  # rowsum(dO o O)
        size = b * h * n * blk * widest * blk
        tiles = torch.empty(2 * size, dtype=stats, device=q.device)
        grads = torch.empty(b * h * n * widest * blk * d, dtype=stats, device=q.device)
        dq = torch.zeros(qb.shape, dtype=stats, device=q.device)
        dk = torch.zeros(b, h * n, blk, d, dtype=stats, device=q.device)
        dv = torch.zeros(b, h * n, blk, d, dtype=stats, device=q.device)
        for chunk in chunks:
            index = slots.index[:, :, chunk]
            g = index.shape[-1]
            cols = g * blk
            kj, vj = keys(index), values(index)
            p = tiles[: b * h * n * blk * cols].view(b, h, n, blk, cols)
            torch.matmul(qb, kj.transpose(-1, -2), out=p)
            _apply_mask(p, slots, chunk, causal).sub_(lse.unsqueeze(-1)).exp_()  # masked: exp(-inf) = 0
            flat = _flat(index, n)
            part = grads[: b * h * n * cols * d].view(b, h, n, cols, d)
            torch.matmul(p.transpose(-1, -2), dob, out=part)
            dv.index_add_(1, flat, part.view(b, h * n * g, blk, d))
            ds = tiles[size : size + b * h * n * blk * cols].view(b, h, n, blk, cols)
            torch.matmul(dob, vj.transpose(-1, -2), out=ds)
            ds.sub_(delta).mul_(p)  # dS = P (dP - rowsum(dO o O))
            dq.view(-1, blk, d).baddbmm_(*_bmm(ds, kj))
            torch.matmul(ds.transpose(-1, -2), qb, out=part)
            dk.index_add_(1, flat, part.view(b, h * n * g, blk, d))
        shape = q.shape
        return (
            (dq * scale).to(q.dtype).reshape(shape),
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


# ----------------------------------------------------------------------------- FlexAttention (CUDA)

_compiled_flex = None


def flex_block_mask(layout: torch.Tensor, block: int, seq: int, device: torch.device | str):  # noqa: ANN201
    """FlexAttention's ``BlockMask`` for ``layout`` (heads, blocks, blocks) over ``seq`` tokens,
    decoder-causal: the same element mask as :func:`dense_mask`, built per kernel tile."""
    from torch.nn.attention.flex_attention import create_block_mask

    kept = layout.bool().to(device)

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return kept[h, q_idx // block, kv_idx // block] & (kv_idx <= q_idx)

    tile = block if block % 128 == 0 else 128  # the kernel's tile; the layout's block is enforced by mask_mod
    return create_block_mask(mask_mod, None, layout.shape[0], seq, seq, device=device, BLOCK_SIZE=tile)


def flex_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, compiled: bool = True):  # noqa: ANN001, ANN201
    """Block-sparse attention through FlexAttention with ``block_mask`` (:func:`flex_block_mask`):
    compiled on CUDA, where it has a backward; on a CPU (forward only in torch 2.13) as is."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if compiled:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)
