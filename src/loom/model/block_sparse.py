"""Block-sparse attention whose cost follows the layout's non-zero blocks; no dense score matrix.

``block_sparse_attention(q, k, v, layout, block)``: q, k, v ``(batch, heads, S, d)``;
``layout`` ``(heads, S / block, S / block)`` (:mod:`loom.sparsity`). Query block i of head h
attends the key blocks ``layout[h, i]``, causally inside the diagonal block when
``causal``. Equal to dense attention under the same element mask, forward and backward.

The layout is compiled once into ``slots``: for each head and query block, the list of its
key blocks (its own first) padded to the longest row (``width``). The heads x blocks query rows
are taken in groups whose score tile is about ``TILE_BYTES``, so the exp, max and mask passes
over it run from cache (over the whole stack at once they ran from memory: 2-2.5x slower at
8k-16k tokens, measured), and each group walks its own longest row's slots a chunk at a time (about ``CHUNK_COLUMNS`` keys) with
an online softmax (Milakov and Gimelshein, 2018; as flash attention): a chunk gathers g key and
value blocks per query block, takes their scores in one batched matmul, and folds them into a
running maximum, sum and output. Forward keeps for backward only q, k, v, the output and the
log-sum-exp per query. Backward recomputes each chunk's probabilities from the log-sum-exp and
scatters the key and value gradients back to their blocks (``index_add``):

    P = exp(S - lse),  dV_j += P^T dO,  dP = dO V_j^T,  dS = P (dP - rowsum(dO o O)),
    dQ += dS K_j scale,  dK_j += dS^T Q scale.

Work and memory: ``heads x S/block x width`` tiles of ``block^2`` scores at most, so a layout
with a fixed number of blocks per row (a window) is linear in S. A row shorter than its group's
longest pads with empty slots (masked), which cost the work of full ones: a skewed layout
(summary columns, which later rows attend more of) pays for each group's longest row, and a
global row attending everything for its group's.
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

    def chunks(self, width: int | None = None) -> list[slice]:
        """Consecutive slots taken together: about ``CHUNK_COLUMNS`` key columns a tile, over the
        first ``width`` slots (default: all)."""
        width = self.width if width is None else width
        step = max(1, min(self.width, CHUNK_COLUMNS // self.block))
        return [slice(t, min(t + step, width)) for t in range(0, width, step)]

    def group_widths(self, groups: list[slice]) -> list[int]:
        """The longest row of each group of (heads x blocks) query rows: the slots it walks, so a
        skewed layout (summary columns: later rows attend more) pays for each group's own longest
        row, not the layout's."""
        counts = self.valid.reshape(-1, self.width).sum(-1)
        return [int(counts[rows].max()) for rows in groups]


def _flat(index: torch.Tensor, blocks: int) -> torch.Tensor:
    """Per-head block indices (heads, rows, g) -> rows of a (heads x blocks) stack, flattened."""
    heads = index.shape[0]
    return (index + torch.arange(heads, device=index.device).view(heads, 1, 1) * blocks).reshape(-1)


TILE_BYTES = 2 * 2**20  # a row group's score tile: its elementwise passes run from cache, few enough groups


def _groups(rows: int, cols: int, blk: int, batch: int) -> list[slice]:
    """Consecutive query rows (of the heads x blocks stack) taken together: a score tile of about
    ``TILE_BYTES`` (fp32), so the elementwise passes over it run from cache, not memory."""
    per_row = batch * blk * cols * 4
    step = max(1, min(rows, TILE_BYTES // per_row))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


class _Rows:
    """Key or value blocks of the heads x blocks stack, gathered per row group and chunk:
    (batch, rows, g x block, d) in the statistics dtype."""

    def __init__(self, x: torch.Tensor, blk: int, dtype: torch.dtype) -> None:
        b, h, s, d = x.shape
        self.rows = x.reshape(b, h * (s // blk), blk, d)
        self.dtype = dtype

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        r, g = index.shape
        b, _, blk, d = self.rows.shape
        out = torch.index_select(self.rows, 1, index.reshape(-1))
        return out.view(b, r, g * blk, d).to(self.dtype)


def _mask(scores: torch.Tensor, valid: torch.Tensor, first: bool, causal: bool, blk: int) -> torch.Tensor:
    """In place on (batch, rows, block, g x block) scores: -inf for padding slots (``valid``
    (rows, g) False), and for the future inside each row's own block (slot 0's first columns)."""
    if not bool(valid.all()):
        ninf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
        padding = torch.where(valid, 0.0, ninf).to(scores.dtype).repeat_interleave(blk, -1)
        scores.add_(padding.unsqueeze(1))
    if causal and first:
        future = torch.ones(blk, blk, dtype=torch.bool, device=scores.device).triu(1)
        scores[..., :blk].masked_fill_(future, float("-inf"))
    return scores


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slots: Slots, causal: bool, scale: float):  # noqa: ANN001, ANN205
        stats = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        b, h, s, d = q.shape
        blk = slots.block
        n = s // blk
        index, valid = _flat(slots.index, n).view(h * n, -1), slots.valid.reshape(h * n, -1)
        qb = q.reshape(b, h * n, blk, d)
        keys, values = _Rows(k, blk, stats), _Rows(v, blk, stats)
        out = torch.empty(b, h * n, blk, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h * n, blk, dtype=stats, device=q.device)
        widest = max(c.stop - c.start for c in slots.chunks())
        groups = _groups(h * n, widest * blk, blk, b)
        for rows, width in zip(groups, slots.group_widths(groups), strict=True):
            chunks = slots.chunks(width)
            qg = qb[:, rows].to(stats) * scale
            running_max = running_sum = acc = None
            for chunk in chunks:
                idx = index[rows, chunk]
                scores = _mask(qg @ keys(idx).transpose(-1, -2), valid[rows, chunk], chunk.start == 0, causal, blk)
                if running_max is None:  # the first chunk holds each row's own block: a finite maximum
                    running_max = scores.amax(-1)
                    p = scores.sub_(running_max.unsqueeze(-1)).exp_()
                    running_sum, acc = p.sum(-1), p @ values(idx)
                    continue
                new_max = torch.maximum(running_max, scores.amax(-1))
                p = scores.sub_(new_max.unsqueeze(-1)).exp_()
                correction = torch.exp(running_max - new_max)
                running_sum = running_sum.mul_(correction).add_(p.sum(-1))
                acc = acc.mul_(correction.unsqueeze(-1)).add_(p @ values(idx))
                running_max = new_max
            torch.div(acc, running_sum.unsqueeze(-1), out=out[:, rows])
            torch.add(running_max, running_sum.log_(), out=lse[:, rows])
        out = out.view(q.shape)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.slots, ctx.causal, ctx.scale = slots, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        slots, causal, scale = ctx.slots, ctx.causal, ctx.scale
        stats = lse.dtype
        b, h, s, d = q.shape
        blk = slots.block
        n = s // blk
        index, valid = _flat(slots.index, n).view(h * n, -1), slots.valid.reshape(h * n, -1)
        qb = q.reshape(b, h * n, blk, d)
        dob = grad_out.contiguous().reshape(b, h * n, blk, d)
        ob = out.reshape(b, h * n, blk, d)
        keys, values = _Rows(k, blk, stats), _Rows(v, blk, stats)
        dq = torch.empty(b, h * n, blk, d, dtype=q.dtype, device=q.device)
        dk = torch.zeros(b, h * n, blk, d, dtype=stats, device=q.device)
        dv = torch.zeros(b, h * n, blk, d, dtype=stats, device=q.device)
        widest = max(c.stop - c.start for c in slots.chunks())
        groups = _groups(h * n, widest * blk, blk, b)
        for rows, width in zip(groups, slots.group_widths(groups), strict=True):
            chunks = slots.chunks(width)
            qg = qb[:, rows].to(stats) * scale
            dog = dob[:, rows].to(stats)
            delta = (dog * ob[:, rows].to(stats)).sum(-1, keepdim=True)  # rowsum(dO o O)
            lse_g = lse[:, rows].unsqueeze(-1)
            dqg = None
            for chunk in chunks:
                idx = index[rows, chunk]
                r, g = idx.shape
                kj, vj = keys(idx), values(idx)
                p = _mask(qg @ kj.transpose(-1, -2), valid[rows, chunk], chunk.start == 0, causal, blk)
                p = p.sub_(lse_g).exp_()  # masked: exp(-inf) = 0
                flat = idx.reshape(-1)
                dv.index_add_(1, flat, (p.transpose(-1, -2) @ dog).view(b, r * g, blk, d))
                ds = (dog @ vj.transpose(-1, -2)).sub_(delta).mul_(p)  # dS = P (dP - rowsum(dO o O))
                part = ds @ kj
                dqg = part if dqg is None else dqg.add_(part)
                dk.index_add_(1, flat, (ds.transpose(-1, -2) @ qg).view(b, r * g, blk, d))
            torch.mul(dqg, scale, out=dq[:, rows])
        shape = q.shape
        return dq.view(shape), dk.to(k.dtype).view(shape), dv.to(v.dtype).view(shape), None, None, None


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
