"""Causal attention with dropout on the probabilities, loom's own core for devices whose
fused kernels have no dropout (CPU: torch's flash kernel refuses it and its math path draws
the mask with ``bernoulli_``, one thread at ~7-12 ns an element here).

    S = (q / sqrt(d)) k^T + causal mask,  P = softmax(S),  O = (P * keep) v / (1 - p')

``keep`` is :func:`loom.model.dropout.keep_mask`'s (uint8, ``p`` rounded to p', a multiple of
2^-15, the scale 1 / (1 - p') keeping E[O] exact), drawn from the active default generator:
torch's checkpoint (selective recomputation) and loom's RNG streams replay it.

Saved for backward: q, k and v as given, P in fp32 and ``keep`` as uint8: 5 bytes per score
(torch's math path keeps the scores, an fp32 mask and the dropped scores: 12). The dropped
scores are rebuilt from P and ``keep`` in backward. Computation runs in fp32 for 16-bit
inputs (as torch's math path does on CPU); the output has the inputs' dtype.

Grouped-query heads: query head i reads K/V head i // (heads / kv_heads), as
``scaled_dot_product_attention(enable_gqa=True)``; the groups are folded into the rows, so
K and V are never expanded.
"""

from __future__ import annotations

import torch

from loom.model.dropout import fill_keep_mask, quantized_p

TILE_ELEMENTS = 1 << 18  # scores per tile: 1 MiB in fp32, its temporaries stay in cache


def tiles(slabs: int, rows: int, cols: int, budget: int | None = None) -> list[tuple[int, int, int, int]]:
    """(slab_start, slab_end, row_start, row_end) pieces of a (slabs, rows, cols) score tensor,
    in memory order, each of about ``budget`` elements or fewer: whole slabs together when a
    slab fits, else one slab's rows in runs of a multiple of 4 (so the keep mask drawn piece by
    piece is the one drawn at once). Every piece is a contiguous slice. ``budget``: TILE_ELEMENTS."""
    budget = budget or TILE_ELEMENTS
    per_slab = rows * cols
    if per_slab <= budget:
        step = max(1, budget // per_slab)
        return [(i, min(i + step, slabs), 0, rows) for i in range(0, slabs, step)]
    run = max(4, budget // cols // 4 * 4)
    return [(i, i + 1, r, min(r + run, rows)) for i in range(slabs) for r in range(0, rows, run)]


def _causal(rows: range, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(len(rows), s): -inf where a row's query (at position row mod s: the rows run over each
    query head's positions in turn) must not see the key, else 0; one tile's, never s x s whole."""
    positions = torch.arange(rows.start, rows.stop, device=device) % s
    unseen = torch.arange(s, device=device) > positions[:, None]
    return torch.zeros(unseen.shape, dtype=dtype, device=device).masked_fill_(unseen, float("-inf"))


class _DropoutAttention(torch.autograd.Function):
    """Tile by tile (:func:`tiles`): only P and ``keep`` are whole; each tile's scores, bits and
    products are small enough to stay in cache, and reuse the allocator's blocks instead of
    page-faulting fresh mappings every layer. Slabs are (batch, K/V head) pairs, their rows the
    group's query heads' positions."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        b, heads, s, d = q.shape
        kv = k.shape[1]
        group = heads // kv
        work = torch.promote_types(q.dtype, torch.float32)
        scale, kept = d**-0.5, 1.0 / (1.0 - quantized_p(p))
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores and probabilities under autocast too
            qs = (q.to(work) * scale).reshape(b * kv, group * s, d)
            keys = k.to(work).reshape(b * kv, s, d).transpose(1, 2)
            values = v.to(work).reshape(b * kv, s, d)
            probs = torch.empty(b * kv, group * s, s, dtype=work, device=q.device)
            keep = torch.empty(b * kv, group * s, s, dtype=torch.uint8, device=q.device)
            out = torch.empty(b * kv, group * s, d, dtype=work, device=q.device)
            pieces = tiles(b * kv, group * s, s)
            whole = _causal(range(group * s), s, work, q.device) if pieces[0][3] == group * s else None
            for i, j, r, t in pieces:
                bias = whole if whole is not None else _causal(range(r, t), s, work, q.device)
                scores = torch.bmm(qs[i:j, r:t], keys[i:j]).add_(bias)
                torch.ops.aten._softmax.out(scores, -1, False, out=probs[i:j, r:t])
                fill_keep_mask(keep[i:j, r:t], p)
                torch.bmm(probs[i:j, r:t] * keep[i:j, r:t], values[i:j], out=out[i:j, r:t])
            out.mul_(kept)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.kept, ctx.scale = kept, scale
        return out.view(b, heads, s, d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(grad.device.type, enabled=False):  # as the forward: fp32 throughout
            return _DropoutAttention._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):
        q, k, v, probs, keep = ctx.saved_tensors
        b, heads, s, d = q.shape
        kv = k.shape[1]
        work = probs.dtype
        grad = (grad.to(work) * ctx.kept).reshape(b * kv, -1, d)
        queries = q.to(work).reshape(b * kv, -1, d)
        keys = k.to(work).reshape(b * kv, s, d)
        values_t = v.to(work).reshape(b * kv, s, d).transpose(1, 2)
        grad_q = torch.empty_like(queries)
        grad_k = torch.zeros_like(keys)
        grad_v = torch.zeros_like(keys)
        for i, j, r, t in tiles(*probs.shape):
            probs_t, keep_t, grad_t = probs[i:j, r:t], keep[i:j, r:t], grad[i:j, r:t]
            grad_v[i:j].baddbmm_((probs_t * keep_t).transpose(1, 2), grad_t)
            grad_probs = torch.bmm(grad_t, values_t[i:j]).mul_(keep_t)
            grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs_t, -1, work).mul_(ctx.scale)
            torch.bmm(grad_scores, keys[i:j], out=grad_q[i:j, r:t])
            grad_k[i:j].baddbmm_(grad_scores.transpose(1, 2), queries[i:j, r:t])
        grad_q = grad_q.view(b, heads, s, d)
        return grad_q.to(q.dtype), grad_k.view(k.shape).to(k.dtype), grad_v.view(v.shape).to(v.dtype), None


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal) dropped out with probability ``p`` (module docstring),
    times v. q: (batch, heads, seq, d); k, v: (batch, kv_heads, seq, d), heads % kv_heads == 0."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout_attention needs 0 < p < 1, got {p}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of K/V heads ({k.shape[1]})")
    return _DropoutAttention.apply(q, k, v, p)
