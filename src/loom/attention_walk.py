"""Which scores loom's attention kernels compute and keep, and in what order: what the kernels
build from a layout (:mod:`loom.sparsity`) and what the planner counts.

- The torch-ops block-sparse kernel (:mod:`loom.model.block_sparse`, ``kernel = "torch"``; the
  C++ kernel, :mod:`loom.model.block_sparse_cpp`, computes the kept blocks and nothing else)
  walks a layout's rows: each row's band
  (the blocks ending at its diagonal, read as a strided view) and the rest gathered
  (:func:`row_slots`), rows of an aligned run sharing what they gather (:func:`shared_run`); or,
  for a causal layout of aligned windows and shared columns, window by window
  (:class:`Windows`, :func:`local_windows`, :func:`windowed_walk`;
  :mod:`loom.model.block_windows`). It keeps a row's probabilities for backward where the row
  spans at most :data:`SAVED_COLUMNS` keys (:func:`saved_probability_columns`).
- What the planner reads: the share of blocks kept (:func:`layout_density`, model FLOPs), the
  share of scores a kernel computes (:func:`computed_density`, step time; FlexAttention's tiles
  on CUDA), the padded slots per row (:func:`slot_width`, kept probabilities); each remembered by
  value, since a planner search asks for the same layout's figures for every candidate.
- The dense causal core with dropout (:mod:`loom.model.dropout_attention`) computes the causal
  triangle as row runs (:func:`causal_runs`, :func:`causal_run_scores`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loom.sparsity import SparsityConfig, head_layout

MEMO_ENTRIES = 256  # layouts' figures remembered per function: the planner asks for each of hundreds of layouts


def _by_value(fn: Callable) -> Callable:
    """Remember ``fn``'s answer by the value of its arguments (a config's repr: its lists make it
    unhashable): the planner asks the same layout's figures for every candidate layout of a search,
    and each builds the (S / block)^2 layout (at 16k tokens, 2,048 calls of ``slot_width`` took 41 s
    of a 4-device search's 54, measured)."""
    memo: dict[str, object] = {}

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        key = repr((args, sorted(kwargs.items()), SAVED_COLUMNS, GATHER_COST, WINDOW_GATHER_COST))  # and the knobs
        if key not in memo:
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[key] = fn(*args, **kwargs)
        return memo[key]

    return wrapper


@_by_value
def layout_density(config: SparsityConfig, num_heads: int, seq_len: int) -> float:
    """The fraction of the (S / block)^2 blocks a layout keeps, averaged over its heads (at most 4
    distinct heads are built): what the planner scales the attention's s^2 FLOPs by."""
    config.validate(seq_len)
    n = seq_len // config.block
    heads = min(num_heads, 4) if config.different_layout_per_head else 1
    return sum(int(head_layout(config, h, n).sum()) for h in range(heads)) / (heads * n * n)


# A layout whose rows span at most this many key columns (padded width x block) has the kernel
# keep its probabilities for backward rather than recompute them (loom.model.block_sparse).
SAVED_COLUMNS = 512
# What gathering a key block costs against computing on it: the band grows by a block while more
# than 1 / (1 + GATHER_COST) of the rows have it (the others compute that slot masked).
GATHER_COST = 0.3
# What a block the row walk gathers costs it against the window walk, in computed slots: the
# gather, its gradient's index_add and the smaller matmuls of a run. Measured (2 threads), window
# walk against row walk: fixed (local 4) at 2k tokens 76 ms against 90 for 1,920 slots against
# 1,664 and 576 gathered; local 8 at 8k 524 against 531 ms for 15,872 against 12,816 and 4,872;
# local 16 (global 2) at 8k 1,075 against 705 ms for 23,552 against 16,704 and 5,280.
WINDOW_GATHER_COST = 1.0


def row_slots(layout: torch.Tensor, run: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The kernel's order of each row's key blocks: ``(index, valid, band)``, index and valid
    ``(heads, blocks, width)``.

    The first ``band`` slots of row i are the blocks i - band + 1 .. i, ascending (the diagonal
    last), whether kept or not (``valid`` says; a block before the sequence is clamped to 0 and
    invalid): a contiguous run of keys the kernel reads as a strided view, without gathering. The
    other kept blocks follow in ascending order, padded to the longest row. ``band`` is the largest
    run length at least 1 / (1 + ``GATHER_COST``) of the rows have in full (the last block of a run
    costs a masked slot on the rows without it, and saves a gather on those with it); 1 at least,
    every row attends its own block.

    ``run`` > 1 (a divisor of the blocks): the rows i of one aligned run (i // run alike) share the
    slots past the band, the union of their kept blocks there (ascending), each row's ``valid``
    saying which of them it keeps, so the kernel gathers them once for the run's rows
    (:func:`shared_run`).
    """
    layout = layout.bool() | torch.eye(layout.shape[-1], dtype=torch.bool)
    heads, n, _ = layout.shape
    if n % run:
        raise ValueError(f"a run of {run} rows does not divide the layout's {n} blocks")
    band, rest = _rest(layout)  # rest (heads, n, n): kept blocks outside the band
    rows = torch.arange(n)
    start = rows.view(n, 1) - band + 1 + torch.arange(band).view(1, band)  # (n, band) band blocks
    band_index = start.clamp(min=0).expand(heads, n, band)
    band_valid = (start >= 0) & torch.gather(layout, 2, start.clamp(min=0).expand(heads, n, band))
    shared = rest.view(heads, n // run, run, n).any(2).repeat_interleave(run, 1)  # the run's union
    counts = shared.sum(-1)
    extra = int(counts.max().item())
    order = torch.sort(torch.where(shared, rows.view(1, 1, n), n), dim=-1).values[..., :extra]
    rest_index = torch.where(torch.arange(extra).view(1, 1, extra) < counts.unsqueeze(-1), order, 0)
    rest_valid = torch.gather(rest, 2, rest_index) & (torch.arange(extra).view(1, 1, extra) < counts.unsqueeze(-1))
    index = torch.cat([band_index, rest_index], -1)
    valid = torch.cat([band_valid, rest_valid], -1)
    return index, valid, band


def _band(layout: torch.Tensor) -> int:
    """:func:`row_slots`' band for a layout whose diagonal is kept."""
    heads, n, _ = layout.shape
    rows = torch.arange(n)
    run = torch.zeros(heads, n, dtype=torch.long)  # kept blocks ending at the diagonal, unbroken
    alive = torch.ones(heads, n, dtype=torch.bool)
    for back in range(n):
        col = rows - back
        kept = (col >= 0) & layout[:, rows, col.clamp(min=0)]
        alive &= kept
        if not bool(alive.any()):
            break
        run += alive
    band = 1
    while band < n and (run >= band + 1).float().mean().item() * (1 + GATHER_COST) > 1:
        band += 1
    return band


def _rest(layout: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(band, rest)`` of a layout whose diagonal is kept: :func:`row_slots`' band and the kept
    blocks outside it, ``(heads, n, n)``."""
    band = _band(layout)
    return band, layout & ~_in_band(layout.shape[-1], band)


def _in_band(n: int, band: int) -> torch.Tensor:
    """(n, n): True where key block j lies in query block i's band, i - band + 1 .. i."""
    rows = torch.arange(n)
    return (rows.view(1, n) >= rows.view(n, 1) - band + 1) & (rows.view(1, n) <= rows.view(n, 1))


def shared_run(layout: torch.Tensor, block: int) -> int:
    """How many consecutive rows share their gathered key blocks (:func:`row_slots`' ``run``): 1, 2,
    4 or 8, whichever computes the fewest slots plus ``GATHER_COST`` per block gathered.

    Sharing gathers a key block once for the run's rows and multiplies their queries in one
    matmul of ``run x block`` rows; it computes the union of their blocks for every row (masked
    where a row lacks one). fixed's summary columns are the same for every row of a window: at 8k
    tokens (local 4, global 1, block 64) runs of 4 compute 8% more slots and gather 3.7x fewer
    blocks. Rows whose probabilities the kernel keeps (:func:`saved_probability_columns`) stay
    alone: their one score tile spans the band and the rest.
    """
    layout = layout.bool() | torch.eye(layout.shape[-1], dtype=torch.bool)
    heads, n, _ = layout.shape
    band, rest = _rest(layout)
    if saved_probability_columns(band + int(rest.sum(-1).max()), block) > 0:
        return 1
    best, best_cost = 1, None
    for run in (1, 2, 4, 8):
        if n % run:
            continue
        union = rest.view(heads, n // run, run, n).any(2).sum(-1)  # (heads, runs): blocks each run gathers
        cost = heads * n * band + run * int(union.sum()) + GATHER_COST * int(union.sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = run, cost
    return best


@dataclass(frozen=True, eq=False)
class Windows:
    """A causal layout made of aligned local windows and shared columns: row i, in window
    ``w = i // size``, keeps every block of its window up to itself and, before its window,
    exactly those of its head's ``columns`` that lie there, ``before[w]`` of them (the same count
    for every head; a short last window where ``size`` does not divide the blocks). fixed's
    summary columns, and global blocks beside aligned local windows, are such columns.

    The kernel (:mod:`loom.model.block_windows`) then reads each window's queries, keys and values
    as views, and the columns, gathered once a call, as a prefix (``before[w]`` of them): no block
    gathered per row, no gradient scattered per row. It computes ``size`` x (``size`` +
    ``before[w]``) slots for a window's rows, their whole window for each: (size - 1) / 2 masked
    slots a row on average, none past the window."""

    size: int  # blocks per window
    columns: torch.Tensor  # (heads, M) long: each head's shared key blocks, ascending
    before: tuple[int, ...]  # per window: how many of the columns lie before it

    def computed(self, blocks: int) -> int:
        """Slots computed for one head: each window's rows times its blocks and its columns."""
        total = 0
        for w, start in enumerate(range(0, blocks, self.size)):
            rows = min(self.size, blocks - start)
            total += rows * (rows + self.before[w])
        return total


def local_windows(layout: torch.Tensor) -> Windows | None:
    """The :class:`Windows` a layout is made of, with the smallest window that describes it; None
    where none does (the layout keeps a block past the diagonal, a row lacks part of its window,
    rows of a head keep different blocks before their windows, heads' counts differ)."""
    layout = layout.bool() | torch.eye(layout.shape[-1], dtype=torch.bool, device=layout.device)
    heads, n, _ = layout.shape
    i = torch.arange(n, device=layout.device).view(n, 1)
    j = i.view(1, n)
    if (layout & (j > i)).any():
        return None
    # a window of `size` needs rows 0 .. size - 1 to keep every block up to themselves
    lower = torch.ones(n, n, dtype=torch.bool, device=layout.device).tril()
    whole = (layout | ~lower).all(-1).all(0)  # (n,): row keeps all of 0 .. itself
    limit = n if bool(whole.all()) else int(torch.nonzero(~whole)[0])
    for size in range(1, limit + 1):
        start = i // size * size
        own = (j >= start) & (j <= i)
        if not bool((layout | ~own).all()):
            continue
        before = j < start
        shared = (layout & before).any(1)  # (heads, n): kept by some row before its window
        if not torch.equal(layout & before, shared.unsqueeze(1) & before):
            continue
        counts = torch.stack([shared[:, :s].sum(-1) for s in range(0, n, size)], -1)  # (heads, windows)
        if not bool((counts == counts[:1]).all()):
            continue
        columns = torch.stack([torch.nonzero(shared[h]).view(-1) for h in range(heads)])
        return Windows(size, columns, tuple(int(c) for c in counts[0]))
    return None


def windowed_walk(
    layout: torch.Tensor, block: int, rows: tuple[int, torch.Tensor, torch.Tensor, int] | None = None
) -> Windows | None:
    """The :func:`local_windows` the kernel walks instead of its rows: where the rows would
    recompute their probabilities (wider than :data:`SAVED_COLUMNS`) and the windows compute no
    more slots than the row walk computes plus :data:`WINDOW_GATHER_COST` for each block it
    gathers. fixed at 8k tokens (local 4, global 1, block 64): as many slots as runs of 4 rows,
    none gathered. ``rows``: the row walk, ``(run, *row_slots(layout, run))`` with
    :func:`shared_run`'s run, where the caller has built it already."""
    band, rest = _rest(layout.bool() | torch.eye(layout.shape[-1], dtype=torch.bool))
    if saved_probability_columns(band + int(rest.sum(-1).max()), block) > 0:  # row_slots' width, run 1
        return None
    windows = local_windows(layout)
    if windows is None:
        return None
    computed, gathered = _row_walk(layout, block, rows)
    heads, n, _ = layout.shape
    return windows if heads * windows.computed(n) <= computed + WINDOW_GATHER_COST * gathered else None


def _row_walk(
    layout: torch.Tensor, block: int, rows: tuple[int, torch.Tensor, torch.Tensor, int] | None = None
) -> tuple[int, int]:
    """Slots the row walk computes (each row its band and its run's slots up to the run's longest
    row's last) and blocks it gathers (each run's, once), with :func:`shared_run`'s run (``rows``:
    ``(run, index, valid, band)`` already built)."""
    heads, n, _ = layout.shape
    if rows is None:
        run = shared_run(layout, block)
        index, valid, band = row_slots(layout, run)
    else:
        run, index, valid, band = rows
    width = index.shape[-1]
    last = torch.where(valid[..., band:], torch.arange(band + 1, width + 1), 0)
    need = last.amax(-1).clamp(min=band) if width > band else torch.full((heads, n), band)
    need = need.view(heads, n // run, run).amax(-1)  # a run computes its longest row's slots for each row
    return int(need.sum()) * run, int((need - band).sum())


@_by_value
def computed_density(config: SparsityConfig, num_heads: int, seq_len: int, device: str = "cpu") -> float:
    """The fraction of the S x S scores the kernel computes (kept or masked), over at most 4
    distinct heads as :func:`layout_density`: what the planner's step time scales the attention's
    s^2 FLOPs by (its model FLOPs keep :func:`layout_density`).

    On CPU, loom's C++ kernel (``kernel`` cpp or auto, :mod:`loom.model.block_sparse_cpp`): the
    kept blocks, each causal diagonal block in full, nothing more. Its torch-ops kernel
    (``kernel = "torch"``, :mod:`loom.model.block_sparse`): a layout of local windows and shared
    columns that it walks window by window (:func:`windowed_walk`) computes each window's rows
    against their whole window and the columns before it (fixed at 8k tokens, local 4, global 1,
    block 64: 8% more than it keeps); otherwise each row computes its band and its gathered slots
    up to the last it keeps, a run's longest row's for each of its rows (:func:`shared_run`), a
    floor: a group of rows also computes its longest row's slots for every row (5% more for
    BigBird at 4k, up to 9% for small blocks with a random layout per head).
    On CUDA, FlexAttention's tiles (``block`` tokens where 128 divides it, else 128, as
    :func:`loom.model.block_sparse.flex_block_mask` builds them, decoder-causal): a tile is computed
    in full where it holds a kept block on or below the diagonal, a partial last tile as far as the
    sequence goes."""
    config.validate(seq_len)
    n, block = seq_len // config.block, config.block
    heads = min(num_heads, 4) if config.different_layout_per_head else 1
    layout = torch.stack([head_layout(config, h, n) for h in range(heads)]).bool() | torch.eye(n, dtype=torch.bool)
    if device == "cuda":
        tile = block if block % 128 == 0 else 128
        tiles = -(-seq_len // tile)
        first = torch.arange(n) * block // tile  # the tiles each block's tokens span, per side
        span = int(((torch.arange(n) + 1) * block - 1).div(tile, rounding_mode="floor").sub(first).max()) + 1
        hit = torch.zeros(heads, tiles, tiles, dtype=torch.bool)
        h, i, j = layout.nonzero(as_tuple=True)
        last = ((torch.arange(n) + 1) * block - 1) // tile
        for a in range(span):
            for b in range(span):
                rows, cols = first[i] + a, first[j] + b
                inside = (rows <= last[i]) & (cols <= last[j])
                hit[h[inside], rows[inside], cols[inside]] = True
        hit &= torch.ones(tiles, tiles, dtype=torch.bool).tril()  # a tile wholly past the diagonal is masked: skipped
        side = (
            torch.minimum(torch.arange(1, tiles + 1) * tile, torch.tensor(seq_len)) - torch.arange(tiles) * tile
        ).double()
        area = (hit.double() * side.view(1, -1, 1) * side.view(1, 1, -1)).sum()
        return float(area) / (heads * seq_len * seq_len)
    if config.kernel != "torch":
        if config.attention == "unidirectional":
            layout &= torch.ones(n, n, dtype=torch.bool).tril()
        return int(layout.sum()) / (heads * n * n)
    windows = windowed_walk(layout, block)
    if windows is not None:
        return heads * windows.computed(n) / (heads * n * n)
    return _row_walk(layout, block)[0] / (heads * n * n)


@_by_value
def slot_width(config: SparsityConfig, num_heads: int, seq_len: int) -> int:
    """The kernel's padded slots per row (:func:`row_slots`) over at most 4 distinct heads, as
    :func:`layout_density` builds: with :data:`SAVED_COLUMNS`, what the planner counts of the
    probabilities the kernel keeps."""
    config.validate(seq_len)
    n = seq_len // config.block
    heads = min(num_heads, 4) if config.different_layout_per_head else 1
    return row_slots(torch.stack([head_layout(config, h, n) for h in range(heads)]))[0].shape[-1]


def saved_probability_columns(width: int, block: int) -> int:
    """Key columns per query whose probabilities the kernel keeps for backward: all of a row's
    ``width x block`` when they fit :data:`SAVED_COLUMNS`, else none (it recomputes them)."""
    return width * block if width * block <= SAVED_COLUMNS else 0


def causal_run_length(seq_len: int) -> int:
    """Query rows per run of the dense causal core (:func:`causal_runs`): s / 8 rounded down to a
    multiple of 4, within [64, 128], and the whole sequence when it is no longer than that (shorter
    runs cost more in per-tile overhead than their smaller share of the square saves, measured)."""
    run = min(128, max(64, seq_len // 8 // 4 * 4))
    return seq_len if seq_len <= run else run


def causal_runs(seq_len: int, run: int | None = None) -> list[tuple[int, int]]:
    """The causal triangle as row runs: (start, end) query positions, each run of ``run`` rows
    (default :func:`causal_run_length`) seeing keys [0, end). A core that computes and keeps only
    these rectangles does (n + 1) / 2n of the square's work with n runs, and keeps
    :func:`causal_run_scores` scores a head."""
    run = run or causal_run_length(seq_len)
    return [(r, min(r + run, seq_len)) for r in range(0, seq_len, run)]


def causal_run_scores(seq_len: int, run: int | None = None) -> int:
    """Scores a head keeps over :func:`causal_runs`: sum of (end - start) x end, s (s + run) / 2
    when run divides s (the square s^2 for a single run)."""
    return sum((t - r) * t for r, t in causal_runs(seq_len, run))
