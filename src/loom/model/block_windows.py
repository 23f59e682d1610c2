"""Block-sparse attention walked window by window: a causal layout of aligned local windows and
shared columns (:class:`loom.attention_walk.Windows`: fixed's summary columns, global blocks).

Window w's queries, keys and values are the rows ``[w x size, (w + 1) x size)`` blocks of the
sequence: views, for every batch and head at once. Its queries attend their window causally (one
score tile, the future masked token by token) and, before the window, the first ``before[w]`` of
their head's shared columns: gathered once a call into ``(batch x heads, columns x block, d)``, a
prefix of which is again a view. So no key block is gathered per row and no gradient scattered
per row, as the row walk (:mod:`loom.model.block_sparse`) must for blocks past its band: fixed at
8k tokens (local 4, global 1, block 64) computes as many slots as the row walk's runs of 4 and
gathers none of the 3.7x fewer blocks those runs still gather.

Forward is the online softmax (Milakov and Gimelshein, 2018) over the window's tile and then the
columns ``CHUNK_COLUMNS`` keys at a time, keeping the output and the log-sum-exp per query;
backward recomputes ``P = exp(S - lse)`` chunk by chunk with ``dS = P (dP - rowsum(dO o O))``,
``dV = P^T dO``, ``dK = dS^T Q scale``, ``dQ = dS K scale``. A window's key and value gradients
come from its own queries alone (later windows read only its shared columns), so they are written
once; the columns' gradients accumulate over the windows after them and go back to their blocks
once a call. Heads are taken a few at a time so a score tile stays about ``TILE_BYTES``. Scores
and statistics in fp32 for 16-bit inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.attention_walk import Windows


def scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``a @ b * scale`` in one pass: the scale is the matmul's alpha, not a pass over an operand."""
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    return torch.baddbmm(out, a, b, beta=0, alpha=scale, out=out)


@dataclass(frozen=True)
class _Step:
    """One window for a few heads: its query (and key) tokens, the heads of the (batch x heads)
    stack, and the column tokens it reads in chunks."""

    tokens: slice
    heads: slice
    chunks: list[slice]


def _steps(windows: Windows, blocks: int, stack: int, block: int, tile_bytes: int, chunk_columns: int) -> list[_Step]:
    """The walk: window by window, a few heads at a time, each window's columns in chunks of
    ``chunk_columns`` keys (at least a block)."""
    per_chunk = max(1, chunk_columns // block) * block
    steps = []
    for w, first in enumerate(range(0, blocks, windows.size)):
        tokens = slice(first * block, min(first + windows.size, blocks) * block)
        length = tokens.stop - tokens.start
        ends = windows.before[w] * block
        chunks = [slice(c, min(c + per_chunk, ends)) for c in range(0, ends, per_chunk)]
        heads = max(1, min(stack, tile_bytes // (4 * length * max(length, per_chunk))))
        steps += [_Step(tokens, slice(h, min(h + heads, stack)), chunks) for h in range(0, stack, heads)]
    return steps


def _columns(x: torch.Tensor, columns: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (batch, heads, S, d)'s shared column blocks per head: (batch x heads, M x block, d)."""
    b, h, s, d = x.shape
    picked = x.view(b, h, s // block, block, d)[:, torch.arange(h, device=x.device).view(h, 1), columns]
    return picked.reshape(b * h, columns.shape[1] * block, d)


def future_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """-inf above the diagonal, 0 elsewhere: added to the scores of a diagonal block or a window
    (its queries' future)."""
    future = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill_(future, float("-inf"))


class _Windowed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, windows: Windows, block: int, scale: float, tile_bytes: int, chunk_columns: int):  # noqa: ANN001, ANN205
        with torch.autocast(q.device.type, enabled=False):
            b, h, s, d = q.shape
            stats = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
            steps = _steps(windows, s // block, b * h, block, tile_bytes, chunk_columns)
            qs, ks, vs = (x.reshape(b * h, s, d).to(stats) for x in (q, k, v))
            kc, vc = _columns(k, windows.columns, block).to(stats), _columns(v, windows.columns, block).to(stats)
            triangle = future_mask(windows.size * block, stats, q.device)
            out = torch.empty(b * h, s, d, dtype=stats, device=q.device)
            lse = torch.empty(b * h, s, dtype=stats, device=q.device)
            for step in steps:
                rows, heads = step.tokens, step.heads
                length = rows.stop - rows.start
                qw = qs[heads, rows]
                scores = torch.baddbmm(triangle[:length, :length], qw, ks[heads, rows].transpose(1, 2), alpha=scale)
                top = scores.amax(-1)  # every query keeps its own key: finite
                p = scores.sub_(top.unsqueeze(-1)).exp_()
                total, acc = p.sum(-1), torch.bmm(p, vs[heads, rows])
                for cols in step.chunks:
                    scores = scaled_bmm(qw, kc[heads, cols].transpose(1, 2), scale)
                    new_top = torch.maximum(top, scores.amax(-1))
                    p = scores.sub_(new_top.unsqueeze(-1)).exp_()
                    correction = torch.exp(top - new_top)
                    total = total.mul_(correction).add_(p.sum(-1))
                    acc = acc.mul_(correction.unsqueeze(-1)).baddbmm_(p, vc[heads, cols])
                    top = new_top
                torch.div(acc, total.unsqueeze(-1), out=out[heads, rows])
                torch.add(top, total.log_(), out=lse[heads, rows])
            out = out.to(q.dtype).view(q.shape)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.windows, ctx.block, ctx.scale, ctx.steps = windows, block, scale, steps
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        windows, block, scale = ctx.windows, ctx.block, ctx.scale
        with torch.autocast(q.device.type, enabled=False):
            b, h, s, d = q.shape
            stats = lse.dtype
            qs, ks, vs, outs, dos = (x.reshape(b * h, s, d).to(stats) for x in (q, k, v, out, grad_out))
            kc, vc = _columns(k, windows.columns, block).to(stats), _columns(v, windows.columns, block).to(stats)
            triangle = future_mask(windows.size * block, stats, q.device)
            dq, dk, dv = (torch.empty(b * h, s, d, dtype=stats, device=q.device) for _ in range(3))
            dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
            for step in ctx.steps:
                rows, heads = step.tokens, step.heads
                length = rows.stop - rows.start
                qw, dow = qs[heads, rows], dos[heads, rows]
                delta = (dow * outs[heads, rows]).sum(-1, keepdim=True)  # rowsum(dO o O)
                log_total = lse[heads, rows].unsqueeze(-1)
                kw, vw = ks[heads, rows], vs[heads, rows]
                p = torch.baddbmm(triangle[:length, :length], qw, kw.transpose(1, 2), alpha=scale)
                p = p.sub_(log_total).exp_()  # the future: exp(-inf) = 0
                ds = torch.bmm(dow, vw.transpose(1, 2)).sub_(delta).mul_(p)
                dv[heads, rows] = torch.bmm(p.transpose(1, 2), dow)  # the window's keys: its queries alone
                dk[heads, rows] = scaled_bmm(ds.transpose(1, 2), qw, scale)
                dqw = scaled_bmm(ds, kw, scale)
                for cols in step.chunks:
                    kj, vj = kc[heads, cols], vc[heads, cols]
                    p = scaled_bmm(qw, kj.transpose(1, 2), scale).sub_(log_total).exp_()
                    ds = torch.bmm(dow, vj.transpose(1, 2)).sub_(delta).mul_(p)
                    dvc[heads, cols] += torch.bmm(p.transpose(1, 2), dow)
                    dkc[heads, cols] += scaled_bmm(ds.transpose(1, 2), qw, scale)
                    dqw.baddbmm_(ds, kj, alpha=scale)
                dq[heads, rows] = dqw
            for grad, shared in ((dk, dkc), (dv, dvc)):  # the columns' gradients back to their blocks, once
                blocks = grad.view(b, h, s // block, block, d)
                index = (slice(None), torch.arange(h, device=q.device).view(h, 1), windows.columns)
                blocks[index] += shared.view(b, h, windows.columns.shape[1], block, d)
        shape = q.shape
        grads = (g.to(x.dtype).reshape(shape) for g, x in ((dq, q), (dk, k), (dv, v)))
        return (*grads, None, None, None, None, None)


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: Windows,
    block: int,
    scale: float,
    tile_bytes: int,
    chunk_columns: int,
) -> torch.Tensor:
    """Causal attention of q, k, v ``(batch, heads, S, d)`` (contiguous) under ``windows``' layout."""
    return _Windowed.apply(q, k, v, windows, block, scale, tile_bytes, chunk_columns)
