"""Causal attention with dropout on the probabilities, loom's own core for devices whose
fused kernels have no dropout (CPU: torch's flash kernel refuses it and its math path draws
the mask with ``bernoulli_``, one thread at ~7-12 ns an element here).

    S = (q / sqrt(d)) k^T + causal mask,  P = softmax(S),  O = (P * keep) v / (1 - p')

``keep`` is :func:`loom.model.dropout.keep_mask`'s (uint8, ``p`` rounded to p', a multiple of
2^-16, the scale 1 / (1 - p') keeping E[O] exact), seeded from the active default generator:
torch's checkpoint (selective recomputation) and loom's RNG streams replay it.

Only the causal triangle is computed and kept, as row runs (:func:`loom.attention_walk.causal_runs`):
a run of query rows [r, e) sees keys [0, e), the future inside its diagonal block masked. With
n runs that is (n + 1) / 2n of the square's work and memory (n = 2 at 128 tokens, 4 at 256, 8
from 512 to 1024, s / 128 beyond).

Saved for backward: q, k and v as given, and per run its P in fp32 and ``keep`` as uint8, both
packed run after run: 5 bytes per kept score, :func:`loom.attention_walk.causal_run_scores` scores a
head (torch's math path keeps the whole square: scores, an fp32 mask and the dropped scores, 12
bytes a score). The dropped scores are rebuilt from P and ``keep`` in backward. With
``recompute`` (selective recomputation) only q, k, v and the mask's seed are kept, and backward
computes ``keep`` again, bit for bit, and P tile by tile inside its own loop, each tile used
while in cache and never packed (so the whole P is never held again, not even for a moment), but
not O = (P * keep) v, which backward does not read: a checkpoint around the core would run that
product again too (at 32 heads x 512 tokens x head dim 32 on this host the core's forward took
8.0 ms, 5.6 without the product). Computation runs in fp32 for 16-bit inputs (as torch's math
path does on CPU); the output has the inputs' dtype.

Grouped-query heads: query head i reads K/V head i // (heads / kv_heads), as
``scaled_dot_product_attention(enable_gqa=True)``; a run's rows of the group's query heads are
stacked, so K and V are never expanded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from loom.attention_walk import causal_runs
from loom.model.dropout import draw_seed, fill_keep_mask, quantized_p

TILE_ELEMENTS = 1 << 18  # scores per tile at most (unless one slab's run is larger): 1 MiB in fp32
RUN: int | None = None  # rows per run; None: loom.attention_walk.causal_run_length (tests set small ones)


class Tile(NamedTuple):
    """Slabs [first, last) ((batch, K/V head) pairs) of one run of query positions [start, end),
    which see keys [0, end); its scores lie at ``offset`` in the packed P and ``keep``, laid out
    (slabs, group x rows, end)."""

    first: int
    last: int
    start: int
    end: int
    offset: int


def tiles(slabs: int, group: int, seq_len: int, budget: int | None = None) -> tuple[list[Tile], int]:
    """The tiles of a (slabs, group query heads, seq_len) causal core, run after run, each run's
    slabs chunked to about ``budget`` scores (TILE_ELEMENTS; at least one slab), and the packed
    length: slabs x group x :func:`loom.attention_walk.causal_run_scores`."""
    budget = budget or TILE_ELEMENTS
    out, offset = [], 0
    for r, e in causal_runs(seq_len, RUN):
        per_slab = group * (e - r) * e
        step = max(1, budget // per_slab)
        for i in range(0, slabs, step):
            j = min(i + step, slabs)
            out.append(Tile(i, j, r, e, offset))
            offset += (j - i) * per_slab
    return out, offset


def _future(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(rows, rows): -inf above the diagonal (a run's queries must not see later keys of its own
    diagonal block), else 0; the top-left corner of a longer run's serves a shorter last run."""
    unseen = torch.ones(rows, rows, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(rows, rows, dtype=dtype, device=device).masked_fill_(unseen, float("-inf"))


def _rows(x: torch.Tensor, tile: Tile) -> torch.Tensor:
    """A run's rows of (slabs, group, s, d) ``x`` as (slabs, group x rows, d): a view for one
    query head per K/V head, else a copy."""
    part = x[tile.first : tile.last, :, tile.start : tile.end]
    return part.reshape(part.shape[0], -1, part.shape[-1])


def _packed(flat: torch.Tensor, tile: Tile, group: int) -> torch.Tensor:
    rows = group * (tile.end - tile.start)
    n = (tile.last - tile.first) * rows * tile.end
    return flat[tile.offset : tile.offset + n].view(tile.last - tile.first, rows, tile.end)


def _probabilities(
    q: torch.Tensor, k: torch.Tensor, p: float, seed: int, work: torch.dtype, packed: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, Iterator[tuple[Tile, torch.Tensor]]]:
    """The packed P (None unless ``packed``) and ``keep`` (:func:`tiles`; ``keep`` drawn at once
    from ``seed``) and an iterator that computes P tile by tile, yielding each tile with its
    probabilities (in the packed P, or else in a scratch tile that the next one overwrites) while
    they are still in cache: the forward multiplies them into v, the recomputing backward uses
    them at once."""
    b, heads, s, d = q.shape
    kv = k.shape[1]
    group = heads // kv
    pieces, total = tiles(b * kv, group, s)
    probs = torch.empty(total, dtype=work, device=q.device) if packed else None
    keep = fill_keep_mask(torch.empty(total, dtype=torch.uint8, device=q.device), p, seed)  # at once: threads

    def fill() -> Iterator[tuple[Tile, torch.Tensor]]:
        queries = (q.to(work) * d**-0.5).reshape(b * kv, group, s, d)
        keys = k.to(work).reshape(b * kv, s, d).transpose(1, 2)
        future = _future(pieces[0].end - pieces[0].start, work, q.device)
        for tile in pieces:
            i, j, r, e = tile.first, tile.last, tile.start, tile.end
            scores = torch.bmm(_rows(queries, tile), keys[i:j, :, :e])
            scores.view(j - i, group, e - r, e)[..., r:e].add_(future[: e - r, : e - r])
            if probs is None:  # the softmax in place: the scores are this tile's own
                yield tile, torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            else:
                yield tile, torch.ops.aten._softmax.out(scores, -1, False, out=_packed(probs, tile, group))

    return probs, keep, fill()


class _DropoutAttention(torch.autograd.Function):
    """Tile by tile (:func:`tiles`): only the packed P and ``keep`` are whole (``keep`` drawn at
    once before the tiles, so a large one spreads over the threads); each tile's scores and
    products are small enough to stay in cache and reuse the allocator's blocks instead of
    page-faulting fresh mappings every layer."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, recompute: bool) -> torch.Tensor:
        b, heads, s, d = q.shape
        kv = k.shape[1]
        group = heads // kv
        work = torch.promote_types(q.dtype, torch.float32)
        kept = 1.0 / (1.0 - quantized_p(p))
        seed = draw_seed(q.device)
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores and probabilities under autocast too
            probs, keep, filled = _probabilities(q, k, p, seed, work)
            values = v.to(work).reshape(b * kv, s, d)
            out = torch.empty(b * kv, group, s, d, dtype=work, device=q.device)
            for tile, probs_t in filled:
                i, j, r, e = tile.first, tile.last, tile.start, tile.end
                part = torch.bmm(probs_t * _packed(keep, tile, group), values[i:j, :e])
                out[i:j, :, r:e] = part.view(j - i, group, e - r, d)
            out.mul_(kept)
        if recompute:
            ctx.save_for_backward(q, k, v)
        else:
            ctx.save_for_backward(q, k, v, probs, keep)
        ctx.kept, ctx.scale, ctx.p, ctx.seed, ctx.work = kept, d**-0.5, p, seed, work
        return out.view(b, heads, s, d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(grad.device.type, enabled=False):  # as the forward: fp32 throughout
            return _DropoutAttention._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):
        q, k, v, *kept = ctx.saved_tensors
        b, heads, s, d = q.shape
        kv = k.shape[1]
        group = heads // kv
        work = ctx.work
        if kept:
            probs, keep = kept
            pieces = ((tile, _packed(probs, tile, group)) for tile in tiles(b * kv, group, s)[0])
        else:  # selective recomputation: the mask again, and P tile by tile, bit for bit, without the product with v
            _, keep, pieces = _probabilities(q, k, ctx.p, ctx.seed, work, packed=False)
        grad = (grad.to(work) * ctx.kept).reshape(b * kv, group, s, d)
        queries = q.to(work).reshape(b * kv, group, s, d)
        keys = k.to(work).reshape(b * kv, s, d)
        values_t = v.to(work).reshape(b * kv, s, d).transpose(1, 2)
        grad_q = torch.empty_like(queries)
        grad_k = torch.zeros_like(keys)
        grad_v = torch.zeros_like(keys)
        for tile, probs_t in pieces:
            i, j, r, e = tile.first, tile.last, tile.start, tile.end
            keep_t, grad_t = _packed(keep, tile, group), _rows(grad, tile)
            grad_v[i:j, :e].baddbmm_((probs_t * keep_t).transpose(1, 2), grad_t)
            grad_probs = torch.bmm(grad_t, values_t[i:j, :, :e]).mul_(keep_t)
            grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs_t, -1, work).mul_(ctx.scale)
            grad_q[i:j, :, r:e] = torch.bmm(grad_scores, keys[i:j, :e]).view(j - i, group, e - r, d)
            grad_k[i:j, :e].baddbmm_(grad_scores.transpose(1, 2), _rows(queries, tile))
        grad_q = grad_q.view(b, heads, s, d)
        return grad_q.to(q.dtype), grad_k.view(k.shape).to(k.dtype), grad_v.view(v.shape).to(v.dtype), None, None


def dropout_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, recompute: bool = False
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal) dropped out with probability ``p`` (module docstring),
    times v. q: (batch, heads, seq, d); k, v: (batch, kv_heads, seq, d), heads % kv_heads == 0.
    ``recompute``: keep only q, k, v and the mask's seed; backward computes P and the mask again."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout_attention needs 0 < p < 1, got {p}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of K/V heads ({k.shape[1]})")
    return _DropoutAttention.apply(q, k, v, p, recompute)
