"""Block-sparse attention whose cost follows the layout's non-zero blocks; no dense score matrix:
the kernel of torch ops (``model.sparse_attention.kernel = "torch"``, and where loom's C++ kernel,
:mod:`loom.model.block_sparse_cpp`, does not build; any dtype, float64 included).

``block_sparse_attention(q, k, v, layout, block)``: q, k, v ``(batch, heads, S, d)``;
``layout`` ``(heads, S / block, S / block)`` (:mod:`loom.sparsity`). Query block i of head h
attends the key blocks ``layout[h, i]``, causally inside the diagonal block when
``causal``. Equal to dense attention under the same element mask, forward and backward.

The layout is compiled once into ``slots`` (:func:`loom.attention_walk.row_slots`): each row's key
blocks, the first ``band`` of them the blocks i - band + 1 .. i (a window ending at the
diagonal) and the rest after them, padded to the longest row. The batch x heads x blocks query
rows form one stack (rows of the same head and batch are consecutive), so the band of a group of
consecutive rows is one strided view of the keys (row r reads rows r - band + 1 .. r: nothing is
copied; a row whose band crosses into the previous head masks those slots), and only the rest is
gathered (``index_select``). Rows are taken in groups whose score tile is about ``TILE_BYTES``, so
the passes over it run from cache (over the whole stack at once they ran from memory: 2-2.5x
slower at 8k-16k tokens, measured), each group walking its own longest row's slots.

Two ways through a group:

- a row of at most ``loom.attention_walk.SAVED_COLUMNS`` keys (windows, BigBird, Longformer at their
  usual sizes): one score tile, torch's fused softmax, and the probabilities P kept for backward
  (``b x heads x S x width x block`` fp32, linear in S), so backward needs neither the scores'
  matmul again nor the exp: ``dV = P^T dO, dS = P (dP - rowsum(dP o P)), dQ = dS K scale,
  dK = dS^T Q scale``;
- wider rows: the band, then the rest ``CHUNK_COLUMNS`` keys at a time with an online softmax
  (Milakov and Gimelshein, 2018; as flash attention), keeping for backward only q, k, v, the
  output and the log-sum-exp per query, and recomputing ``P = exp(S - lse)`` chunk by chunk with
  ``dS = P (dP - rowsum(dO o O))``.

Key and value gradients of the band are multiplied straight into their rows (``baddbmm`` into a
shifted slice, no temporary); in a causal layout walked in the stack's order each row's diagonal
product comes first and writes the row, so the gradients need no pass of zeros (at 8k-16k tokens
the window's call fell 6-7%, measured); the rest go back by ``index_add``. Invalid slots are set
to -inf block by block, not by a masked pass over the tile. Work: ``heads x S/block x width``
tiles of ``block^2`` scores at most, so a layout with a fixed number of blocks per row (a window)
is linear in S. A row shorter than its group's longest pads with masked slots, which cost the
work of full ones, so a skewed layout (summary columns, which later rows attend more of) walks its
rows sorted by length (``_Plan``: fixed's rows at 8k tokens computed 17% more slots than they have
in the stack's order, none sorted; the query-side arrays are copied into that order and back, and
the band is gathered). Rows that keep the same blocks past the band (fixed's summary columns,
the same for every row of a window) share them in aligned runs (``Slots.run``,
:func:`loom.attention_walk.shared_run`): the run's blocks are gathered once and its ``run x block``
queries multiplied at once, each row masking what it lacks; the sorted walk then orders runs,
and a group holds whole runs (fixed at 8k tokens, runs of 4: 8% more slots computed, 3.7x fewer
blocks gathered; its call 2% faster at 8k tokens and 8% at 16k on 2 threads, measured). The scale
rides in the score matmuls (their alpha), never a pass over q. Under autocast the kernel keeps
its own dtypes: scores and statistics in fp32 for 16-bit inputs.

A causal layout of aligned windows and shared columns (:func:`loom.attention_walk.windowed_walk`:
fixed's summary columns at 2k tokens and beyond) is walked window by window instead
(:mod:`loom.model.block_windows`): no gather or scatter per row (fixed at 8k tokens, 2 threads:
the call 566 ms against the row walk's 678, medians of 5 rounds alternating in one process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loom.attention_walk import Windows, row_slots, saved_probability_columns, shared_run, windowed_walk
from loom.model.block_windows import future_mask, scaled_bmm, windowed_attention

CHUNK_COLUMNS = 512  # key columns per score tile: slots beyond the band are taken this many keys at a time
TILE_BYTES = 2 * 2**20  # a row group's score tile: its elementwise passes run from cache, few enough groups
SORTED_GAIN = 0.05  # walk the rows sorted by length where that computes this fraction fewer slots


@dataclass(frozen=True)
class Slots:
    """A layout compiled for the kernel (:func:`loom.attention_walk.row_slots`): ``index[h, i, t]`` is the
    t-th key block of query block i of head h, ``valid`` False for padding. The first ``band``
    slots of row i are the blocks i - band + 1 .. i (the diagonal last), read as a strided view of
    the keys; the rest are gathered, once for each aligned ``run`` of rows, which share them
    (:func:`loom.attention_walk.shared_run`)."""

    index: torch.Tensor  # (heads, blocks, width) long
    valid: torch.Tensor  # (heads, blocks, width) bool
    block: int
    band: int = 1
    run: int = 1
    windows: Windows | None = None  # a causal call walks these windows instead of the rows

    @classmethod
    def of(
        cls,
        layout: torch.Tensor,
        block: int,
        device: torch.device | str = "cpu",
        run: int | None = None,
        walk: str = "auto",
    ) -> Slots:
        """``walk``: ``auto`` walks a layout's windows where :func:`loom.attention_walk.windowed_walk`
        finds them worth it, ``rows`` always its rows."""
        if walk not in ("auto", "rows"):
            raise ValueError(f"walk = {walk!r}: auto or rows")
        chosen = run is None  # shared_run's: the row walk windowed_walk weighs the windows against
        run = shared_run(layout, block) if chosen else run
        index, valid, band = row_slots(layout, run)
        rows = (run, index, valid, band) if chosen else None
        windows = windowed_walk(layout, block, rows) if walk == "auto" else None
        if windows is not None:
            windows = Windows(windows.size, windows.columns.to(device), windows.before)
        return cls(index.to(device), valid.to(device), block, band, run, windows)

    @property
    def width(self) -> int:
        return self.index.shape[-1]

    @property
    def lower(self) -> bool:
        """No slot holds a key block after the last query block of its run (a causal layout's:
        walked in order, every key block's diagonal product comes before any other into it)."""
        rows = torch.arange(self.index.shape[1], device=self.index.device).view(1, -1, 1)
        return bool((self.index <= rows // self.run * self.run + self.run - 1).all())

    def rows(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, valid)`` over the (batch x heads x blocks) stack of rows, ``(rows, width)``:
        a block index becomes its row in the stack."""
        heads, n, width = self.index.shape
        offsets = torch.arange(batch * heads, device=self.index.device).view(batch, heads, 1, 1) * n
        index = (self.index.unsqueeze(0) + offsets).reshape(-1, width)
        return index, self.valid.unsqueeze(0).expand(batch, -1, -1, -1).reshape(-1, width)


@dataclass(frozen=True)
class _Chunk:
    """One chunk of one row group: what forward and backward both read, built once per call
    (:meth:`_Plan.walk`), so backward repeats none of the indexing (fixed at 8k tokens: 23,300
    operations a call fell to 17,500 and the call 8% faster, measured)."""

    rows: slice
    slots: slice
    run: int  # rows sharing the chunk's blocks (1 in the band: each row its own)
    flat: torch.Tensor  # the blocks read, (rows / run) x slots, contiguous: what index_select gathers
    holes: tuple[torch.Tensor, torch.Tensor] | None  # (row in the group, slot in the chunk) of each invalid slot
    diagonal: int | None  # the slot whose block is the rows' own (causal: its future masked)


@dataclass(frozen=True)
class _Plan:
    """How one call walks the rows: groups of rows (a score tile of about ``TILE_BYTES``), each
    with its own longest row's slot count, and whether the probabilities are kept.

    A group computes every slot up to its longest row's, so a skewed layout (summary columns that
    later rows attend more of) pays for the longest row of each group. Where walking the rows
    sorted by their slot count computes ``SORTED_GAIN`` fewer slots, the rows go in that order
    (``order``: the row of the stack each walked row is; ``index`` and ``valid`` follow it): rows
    of equal length then share groups, at the price of copying the query-side arrays into that
    order and back, and of gathering the band (its view needs consecutive rows)."""

    groups: list[slice]
    widths: list[int]
    saved: bool
    index: torch.Tensor  # (rows, width): the slots, in walking order
    valid: torch.Tensor
    order: torch.Tensor | None = None  # None: the stack's own order
    steps: list[list[_Chunk]] = field(default_factory=list, compare=False)  # :meth:`walk`'s, once built

    @classmethod
    def of(cls, index: torch.Tensor, valid: torch.Tensor, band: int, block: int, run: int = 1) -> _Plan:
        rows, width = valid.shape
        saved = saved_probability_columns(width, block) > 0
        columns = width if saved else max(band, min(width - band, CHUNK_COLUMNS // block))
        step = max(1, min(rows, TILE_BYTES // (block * columns * block * 4))) // run * run or run  # whole runs
        groups = [slice(r, min(r + step, rows)) for r in range(0, rows, step)]
        # slots a row needs: the band, and the rest up to its last valid one (a run's: its longest row's)
        last = torch.where(valid[:, band:], torch.arange(band + 1, width + 1, device=valid.device), 0)
        need = last.amax(-1).clamp(min=band) if width > band else torch.full((rows,), band, device=valid.device)
        need = need.view(-1, run).amax(-1)
        widths = [int(need[g.start // run : g.stop // run].max()) for g in groups]
        runs = torch.sort(need, stable=True).indices  # runs walked shortest first, each run's rows in order
        order = (runs.view(-1, 1) * run + torch.arange(run, device=runs.device)).reshape(-1)
        need = need.repeat_interleave(run)
        ranked = need[order]
        sorted_widths = [int(ranked[g.stop - 1]) for g in groups]
        cost = sum((g.stop - g.start) * w for g, w in zip(groups, widths, strict=True))
        if sum((g.stop - g.start) * w for g, w in zip(groups, sorted_widths, strict=True)) < (1 - SORTED_GAIN) * cost:
            return cls(groups, sorted_widths, saved, index[order], valid[order], order)
        return cls(groups, widths, saved, index, valid)

    def walked(self, x: torch.Tensor) -> torch.Tensor:
        """A query-side (rows, ...) array in walking order (itself when that is the stack's)."""
        # index_select: 0.6-1.2 ms for fixed's rows at 8k tokens, x[order] 1.1-1.4
        return x if self.order is None else torch.index_select(x, 0, self.order)

    def placed(self, x: torch.Tensor) -> torch.Tensor:
        """A query-side array from walking order back into the stack's."""
        if self.order is None:
            return x
        return torch.empty_like(x).index_copy_(0, self.order, x)

    def chunks(self, band: int, width: int, block: int) -> list[slice]:
        """The band, then the rest ``CHUNK_COLUMNS`` keys at a time (one tile when ``saved``)."""
        if self.saved:
            return [slice(0, width)]
        step = max(1, CHUNK_COLUMNS // block)
        return [slice(0, band)] + [slice(t, min(t + step, width)) for t in range(band, width, step)]

    def walk(self, band: int, block: int, run: int, causal: bool) -> list[list[_Chunk]]:
        """Each group's chunks (:meth:`chunks`), built on the first call (forward), reused (backward)."""
        if not self.steps:
            for rows, width in zip(self.groups, self.widths, strict=True):
                group = []
                for slots in self.chunks(band, width, block):
                    shared = run if slots.start >= band else 1  # the band is each row's own
                    flat = self.index[rows.start : rows.stop : shared, slots].reshape(-1)
                    hole_rows, hole_slots = (~self.valid[rows, slots]).nonzero(as_tuple=True)
                    holes = (hole_rows, hole_slots) if hole_rows.numel() else None
                    diagonal = band - 1 if causal and slots.start == 0 else None
                    group.append(_Chunk(rows, slots, shared, flat, holes, diagonal))
                self.steps.append(group)
        return self.steps


class _Keys:
    """Key or value blocks of the (rows, block, d) stack for a group of rows and a run of slots:
    the band as a strided view (row r's slots are the rows r - band + 1 .. r, contiguous), the rest
    gathered (``index_select``)."""

    def __init__(self, x: torch.Tensor, band: int, view: bool = True) -> None:
        self.x, self.band, self.view = x, band, view  # view: rows walked in the stack's order

    def viewable(self, rows: slice, slots: slice) -> bool:
        return self.view and slots.start == 0 and slots.stop == self.band and rows.start >= self.band - 1

    def __call__(self, chunk: _Chunk) -> torch.Tensor:
        """(rows, slots x block, d) for a chunk's ``run`` 1; for a run of rows sharing the slots,
        (rows / run, slots x block, d): each run's blocks once."""
        _, blk, d = self.x.shape
        rows, slots = chunk.rows, chunk.slots
        count = slots.stop - slots.start
        if self.viewable(rows, slots):
            start = rows.start - self.band + 1
            offset = self.x.storage_offset() + start * blk * d  # k may be a view into a larger storage
            return self.x.as_strided((rows.stop - rows.start, count * blk, d), (blk * d, d, 1), offset)
        return torch.index_select(self.x, 0, chunk.flat).view(-1, count * blk, d)

    def accumulate(
        self,
        target: torch.Tensor,
        m: torch.Tensor,
        x: torch.Tensor,
        alpha: float,
        chunk: _Chunk,
        index: torch.Tensor,
        fresh: bool,
    ) -> None:
        """target's blocks read at the chunk's slots += (m's columns of each slot)^T @ x * alpha, in
        place: the gradient of what ``__call__`` read, for m ``(rows, block, slots x block)`` and x
        ``(rows, block, d)`` (with the chunk's ``run``, each run's rows in one product).

        Band slots read as a view are multiplied straight into their rows of target (``baddbmm``,
        no temporary and no separate add): the diagonal first, whose rows are ``rows`` themselves,
        so where target's ``rows`` hold nothing yet (``fresh``) it writes them (beta 0) and the
        others add. Gathered slots go through one product per run of them and ``index_add``.
        """
        blk = target.shape[1]
        rows, slots, run = chunk.rows, chunk.slots, chunk.run
        direct = []  # slots whose rows of target are a contiguous run: multiplied in place
        if self.view and slots.start == 0:
            direct = [self.band - 1] + (list(range(self.band - 1)) if rows.start >= self.band - 1 else [])
        for t in direct:
            first = rows.start - self.band + 1 + t
            out = target[first : first + rows.stop - rows.start]
            cols = m[:, :, t * blk : (t + 1) * blk].transpose(1, 2)
            torch.baddbmm(out, cols, x, beta=0 if fresh and t == self.band - 1 else 1, alpha=alpha, out=out)
        runs, start = [], None  # the other slots as runs of consecutive ones
        for t in range(slots.start, slots.stop + 1):
            inside = t < slots.stop and t not in direct
            if inside and start is None:
                start = t
            elif not inside and start is not None:
                runs.append((start, t))
                start = None
        m, x = _shared(m, run), _shared(x, run)
        for a, b in runs:
            cols = m[:, :, (a - slots.start) * blk : (b - slots.start) * blk].transpose(1, 2)
            whole = (a, b) == (slots.start, slots.stop)  # the chunk's own index, else the slots a..b of it
            idx = chunk.flat if whole else index[rows.start : rows.stop : run, a:b].reshape(-1)
            target.index_add_(0, idx, scaled_bmm(cols, x, alpha).view(idx.shape[0], blk, -1))


def _shared(x: torch.Tensor, run: int) -> torch.Tensor:
    """A (rows, block, n) array as (rows / run, run x block, n): each run's rows one matrix (a view)."""
    return x if run == 1 else x.view(x.shape[0] // run, run * x.shape[1], x.shape[2])


def _mask(scores: torch.Tensor, chunk: _Chunk, blk: int, triangle: torch.Tensor) -> None:
    """In place on (rows, block, slots x block) scores: -inf in the blocks of the chunk's invalid
    slots (``holes``; written block by block, not a pass over the tile), and the future inside the
    diagonal block (slot ``diagonal``; None: none here)."""
    if chunk.holes is not None:
        scores.view(scores.shape[0], blk, -1, blk)[chunk.holes[0], :, chunk.holes[1]] = float("-inf")
    if chunk.diagonal is not None:
        scores[..., chunk.diagonal * blk : (chunk.diagonal + 1) * blk].add_(triangle)


class _BlockSparse(torch.autograd.Function):
    """Its own dtypes under autocast: the scores and statistics in fp32 (16-bit inputs) or the inputs'."""

    @staticmethod
    def forward(ctx, q, k, v, slots: Slots, causal: bool, scale: float):  # noqa: ANN001, ANN205
        with torch.autocast(q.device.type, enabled=False):
            return _BlockSparse._forward(ctx, q, k, v, slots, causal, scale)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        with torch.autocast(grad_out.device.type, enabled=False):
            return _BlockSparse._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, q, k, v, slots: Slots, causal: bool, scale: float):  # noqa: ANN001, ANN205
        stats = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        b, h, s, d = q.shape
        blk, band = slots.block, slots.band
        plan = _Plan.of(*slots.rows(b), band, blk, slots.run)
        view = plan.order is None
        qs = plan.walked(q.reshape(-1, blk, d))  # the scale rides in the score matmul (alpha): no pass over q
        keys = _Keys(k.reshape(-1, blk, d).to(stats), band, view)
        values = _Keys(v.reshape(-1, blk, d).to(stats), band, view)
        triangle = future_mask(blk, stats, q.device)
        out = torch.empty(qs.shape, dtype=stats, device=q.device)
        saved = []
        lse = None if plan.saved else torch.empty(qs.shape[:2], dtype=stats, device=q.device)
        for rows, chunks in zip(plan.groups, plan.walk(band, blk, slots.run, causal), strict=True):
            qg = qs[rows].to(stats)
            running_max = running_sum = acc = None
            for chunk in chunks:
                scores = scaled_bmm(_shared(qg, chunk.run), keys(chunk).transpose(1, 2), scale)
                scores = scores.view(qg.shape[0], blk, -1)
                _mask(scores, chunk, blk, triangle)
                if plan.saved:  # one tile: the probabilities, kept for backward
                    p = torch.softmax(scores, -1)
                    torch.bmm(p, values(chunk), out=out[rows])
                    saved.append(p)
                    continue
                # online softmax; the first chunk (the band) holds each row's own block: a finite maximum
                top = scores.amax(-1)
                new_max = top if running_max is None else torch.maximum(running_max, top)
                p = scores.sub_(new_max.unsqueeze(-1)).exp_()
                part = torch.bmm(_shared(p, chunk.run), values(chunk)).view(qg.shape)
                if running_max is None:
                    running_sum, acc = p.sum(-1), part
                else:
                    correction = torch.exp(running_max - new_max)
                    running_sum = running_sum.mul_(correction).add_(p.sum(-1))
                    acc = acc.mul_(correction.unsqueeze(-1)).add_(part)
                running_max = new_max
            if not plan.saved:
                torch.div(acc, running_sum.unsqueeze(-1), out=out[rows])
                torch.add(running_max, running_sum.log_(), out=lse[rows])
        out = plan.placed(out).to(q.dtype).view(q.shape)
        if plan.saved:
            ctx.save_for_backward(q, k, v, *saved)
        else:
            ctx.save_for_backward(q, k, v, out, lse)
        ctx.slots, ctx.causal, ctx.scale, ctx.plan = slots, causal, scale, plan
        return out

    @staticmethod
    def _backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, *kept = ctx.saved_tensors
        slots, causal, scale, plan = ctx.slots, ctx.causal, ctx.scale, ctx.plan
        stats = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        b, h, s, d = q.shape
        blk, band = slots.block, slots.band
        view = plan.order is None
        qs = plan.walked(q.reshape(-1, blk, d))
        dos = plan.walked(grad_out.reshape(-1, blk, d)).to(stats)
        keys = _Keys(k.reshape(-1, blk, d).to(stats), band, view)
        values = _Keys(v.reshape(-1, blk, d).to(stats), band, view)
        triangle = future_mask(blk, stats, q.device)
        # every row's diagonal product is its first in the stack's order when no key block lies after
        # its query block: then it writes the row, and dk, dv need no pass of zeros first
        fresh = view and slots.lower
        blank = torch.empty if fresh else torch.zeros
        dq = torch.empty(dos.shape, dtype=stats, device=q.device)
        dk = blank(dos.shape, dtype=stats, device=q.device)
        dv = blank(dos.shape, dtype=stats, device=q.device)
        if not plan.saved:
            out, lse = kept
            out = plan.walked(out.reshape(dos.shape))
        walk = plan.walk(band, blk, slots.run, causal)  # as forward built it
        for g, (rows, chunks) in enumerate(zip(plan.groups, walk, strict=True)):
            qg, dog, dqg = qs[rows].to(stats), dos[rows], dq[rows]
            if not plan.saved:
                delta = (dog * out[rows].to(stats)).sum(-1, keepdim=True)  # rowsum(dO o O)
            for c, chunk in enumerate(chunks):
                run = chunk.run
                kj, vj = keys(chunk), values(chunk)
                if plan.saved:  # dS = P (dP - rowsum(dP o P))
                    p = kept[g]
                    ds = torch._softmax_backward_data(torch.bmm(dog, vj.transpose(1, 2)), p, -1, stats)
                else:  # P = exp(S - lse), dS = P (dP - rowsum(dO o O))
                    p = scaled_bmm(_shared(qg, run), kj.transpose(1, 2), scale).view(qg.shape[0], blk, -1)
                    _mask(p, chunk, blk, triangle)
                    p = p.sub_(lse[rows].unsqueeze(-1)).exp_()  # masked: exp(-inf) = 0
                    ds = torch.bmm(_shared(dog, run), vj.transpose(1, 2)).view(p.shape).sub_(delta).mul_(p)
                values.accumulate(dv, p, dog, 1.0, chunk, plan.index, fresh and c == 0)  # dV = P^T dO
                dq_run = _shared(dqg, run)  # dQ = dS K scale
                torch.baddbmm(dq_run, _shared(ds, run), kj, beta=1 if c else 0, alpha=scale, out=dq_run)
                keys.accumulate(dk, ds, qg, scale, chunk, plan.index, fresh and c == 0)  # dK = dS^T Q scale
        shape = q.shape
        return (
            plan.placed(dq).to(q.dtype).view(shape),
            dk.to(k.dtype).view(shape),
            dv.to(v.dtype).view(shape),
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
    if causal and slots.windows is not None:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return windowed_attention(q, k, v, slots.windows, slots.block, scale, TILE_BYTES, CHUNK_COLUMNS)
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
