"""Block-sparse attention layouts as data: which key blocks each query block of each head sees.

A layout is a bool tensor ``(heads, S / block, S / block)``: ``layout[h, i, j]`` says that
query block i of head h attends key block j. The builders take the parameter names and
defaults of DeepSpeed's ``SparsityConfig`` classes, so a ``sparse_attention`` block carries
over (``mode`` names the class: ``dense``, ``fixed``, ``variable``, ``bigbird``,
``bslongformer``, ``sliding_window``; loom adds ``strided`` and ``longformer``'s dilation):

- ``dense``: every block;
- ``fixed`` (Sparse Transformer, Child et al. 2019): local windows of ``num_local_blocks``;
  the last ``num_global_blocks`` of each window are summary columns every later row attends
  (``horizontal_global_attention``: and they attend every block, bidirectional only);
  ``num_different_global_patterns`` heads take the summary from different positions;
- ``strided`` (Sparse Transformer): the previous ``num_local_blocks`` blocks, and every
  ``stride_blocks``-th block before (default: the local width);
- ``sliding_window``: ``num_sliding_window_blocks`` centred on the diagonal;
- ``bslongformer`` / ``longformer`` (Beltagy et al. 2020): a sliding window (its steps
  ``dilation`` blocks apart), plus global blocks (``global_block_indices``, or the ranges
  up to ``global_block_end_indices``) that attend and are attended everywhere;
- ``bigbird`` (Zaheer et al. 2020): ``num_random_blocks`` random blocks per row, a sliding
  window, and the first ``num_global_blocks`` blocks global;
- ``variable``: random blocks, local windows of the sizes ``local_window_blocks`` (the last
  repeats), and global blocks as ``bslongformer``'s.

Invariants: ``attention = "unidirectional"`` (a decoder) keeps only blocks j <= i, the
kernel masking the future inside diagonal blocks; every query block attends its own block,
so no token is left with nothing to attend. Random blocks are drawn from a generator seeded
by (``seed``, head), so every rank and every run draws the same layout. Without
``different_layout_per_head`` every head takes head 0's layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loom.errors import LoomError
from loom.parallel.random import stream_seed

MODES = ("dense", "fixed", "strided", "sliding_window", "bslongformer", "longformer", "bigbird", "variable")
DIRECTIONS = ("unidirectional", "bidirectional")


@dataclass
class SparsityConfig:
    """A layout's parameters (``[sparse_attention]`` in a run config); DeepSpeed's names and defaults,
    except ``attention``, which is ``unidirectional`` (loom trains decoders)."""

    mode: str = "fixed"
    block: int = 16
    different_layout_per_head: bool = False
    num_local_blocks: int = 4
    num_global_blocks: int = 1
    attention: str = "unidirectional"
    horizontal_global_attention: bool = False
    num_different_global_patterns: int = 1
    num_random_blocks: int | None = None  # None: the mode's default (bigbird 1, variable 0)
    num_sliding_window_blocks: int = 3
    local_window_blocks: list[int] = field(default_factory=lambda: [4])
    global_block_indices: list[int] = field(default_factory=lambda: [0])
    global_block_end_indices: list[int] | None = None
    stride_blocks: int | None = None  # strided: None is num_local_blocks
    dilation: int = 1  # longformer: blocks between the window's steps
    seed: int = 0  # random blocks

    def random_blocks(self) -> int:
        if self.num_random_blocks is not None:
            return self.num_random_blocks
        return 1 if self.mode == "bigbird" else 0

    def validate(self, seq_len: int | None = None) -> None:
        """Raise a :class:`LoomError` naming the field and the fix; with ``seq_len``, the fields
        that depend on the number of blocks too."""
        _choice("mode", self.mode, MODES)
        _choice("attention", self.attention, DIRECTIONS)
        for name in ("block", "num_local_blocks", "num_global_blocks", "num_different_global_patterns", "dilation"):
            _positive(name, getattr(self, name))
        _positive("num_sliding_window_blocks", self.num_sliding_window_blocks)
        if self.random_blocks() < 0:
            _fail("num_random_blocks", self.num_random_blocks, "must not be negative", "use 0 or more.")
        if self.stride_blocks is not None:
            _positive("stride_blocks", self.stride_blocks)
        if not self.local_window_blocks or any(w <= 0 for w in self.local_window_blocks):
            _fail("local_window_blocks", self.local_window_blocks, "needs positive sizes", "e.g. [4].")
        if self.mode == "fixed" and self.num_local_blocks % self.num_global_blocks:
            _fail(
                "num_local_blocks",
                self.num_local_blocks,
                f"is not a multiple of num_global_blocks = {self.num_global_blocks}",
                "each local window holds a whole number of summary groups: make it a multiple.",
            )
        if self.mode == "fixed" and self.num_different_global_patterns > 1:
            if not self.different_layout_per_head:
                _fail(
                    "num_different_global_patterns",
                    self.num_different_global_patterns,
                    "needs different_layout_per_head = true",
                    "set model.sparse_attention.different_layout_per_head = true, or use 1 pattern.",
                )
            if self.num_different_global_patterns > self.num_local_blocks // self.num_global_blocks:
                _fail(
                    "num_different_global_patterns",
                    self.num_different_global_patterns,
                    f"exceeds num_local_blocks / num_global_blocks = {self.num_local_blocks // self.num_global_blocks}",
                    "use at most that many patterns.",
                )
        if self.horizontal_global_attention and self.attention != "bidirectional":
            _fail(
                "horizontal_global_attention",
                True,
                "needs attention = 'bidirectional' (a global row would see the future)",
                "turn it off for a decoder.",
            )
        ends = self.global_block_end_indices
        if ends is not None:
            if len(ends) != len(self.global_block_indices):
                _fail(
                    "global_block_end_indices",
                    ends,
                    f"has {len(ends)} entries, global_block_indices {len(self.global_block_indices)}",
                    "give one end per start.",
                )
            for start, end in zip(self.global_block_indices, ends):
                if start >= end:
                    _fail("global_block_end_indices", ends, f"has end {end} <= start {start}", "ends are exclusive.")
        if seq_len is None:
            return
        if seq_len % self.block:
            raise LoomError(
                f"model.sparse_attention.block = {self.block} does not divide the sequence length {seq_len}.",
                f"choose a block that divides {seq_len} (e.g. {_divisor_near(seq_len, self.block)}), or change "
                "train.seq_len.",
            )
        blocks = seq_len // self.block
        window = {"sliding_window": self.num_sliding_window_blocks, "bigbird": self.num_sliding_window_blocks}
        window |= dict.fromkeys(("bslongformer", "longformer"), self.num_sliding_window_blocks)
        if self.mode in window and window[self.mode] > blocks:
            _fail(
                "num_sliding_window_blocks",
                window[self.mode],
                f"is wider than the sequence's {blocks} blocks",
                f"use at most {blocks}, or a smaller block.",
            )
        if self.mode in ("fixed", "strided") and self.num_local_blocks > blocks:
            _fail(
                "num_local_blocks",
                self.num_local_blocks,
                f"is wider than the sequence's {blocks} blocks",
                f"use at most {blocks}.",
            )
        if self.random_blocks() > blocks:
            _fail("num_random_blocks", self.random_blocks(), f"exceeds the {blocks} blocks of a row", "use fewer.")
        if self.mode == "bigbird" and self.num_global_blocks > blocks:
            _fail("num_global_blocks", self.num_global_blocks, f"exceeds the {blocks} blocks", "use fewer.")
        if self.mode in ("bslongformer", "longformer", "variable"):
            for index in self.global_block_indices:
                if not 0 <= index < blocks:
                    _fail(
                        "global_block_indices",
                        self.global_block_indices,
                        f"names block {index}, outside the sequence's {blocks} blocks",
                        f"use indices in [0, {blocks}).",
                    )


def make_layout(config: SparsityConfig, num_heads: int, seq_len: int) -> torch.Tensor:
    """The layout ``(num_heads, seq_len / block, seq_len / block)`` (bool) of ``config``."""
    config.validate(seq_len)
    blocks = seq_len // config.block
    heads = num_heads if config.different_layout_per_head else 1
    layout = torch.stack([_head(config, h, blocks) for h in range(heads)])
    if heads == 1:
        layout = layout.expand(num_heads, blocks, blocks).clone()
    return layout


MEMO_ENTRIES = 256  # layouts' figures remembered per function: the planner asks for each of hundreds of layouts


def _by_value(fn: Callable) -> Callable:
    """Remember ``fn``'s answer by the value of its arguments (a config's repr: its lists make it
    unhashable): the planner asks the same layout's figures for every candidate layout of a search,
    and each builds the (S / block)^2 layout (at 16k tokens, 2,048 calls of ``slot_width`` took 41 s
    of a 4-device search's 54, measured)."""
    memo: dict[str, object] = {}

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        key = repr((args, sorted(kwargs.items()), SAVED_COLUMNS, GATHER_COST))  # and the knobs they read
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
    return sum(int(_head(config, h, n).sum()) for h in range(heads)) / (heads * n * n)


# A layout whose rows span at most this many key columns (padded width x block) has the kernel
# keep its probabilities for backward rather than recompute them (loom.model.block_sparse).
SAVED_COLUMNS = 512
# What gathering a key block costs against computing on it: the band grows by a block while more
# than 1 / (1 + GATHER_COST) of the rows have it (the others compute that slot masked).
GATHER_COST = 0.3


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
    band = _band(layout)
    rows = torch.arange(n)
    start = rows.view(n, 1) - band + 1 + torch.arange(band).view(1, band)  # (n, band) band blocks
    band_index = start.clamp(min=0).expand(heads, n, band)
    band_valid = (start >= 0) & torch.gather(layout, 2, start.clamp(min=0).expand(heads, n, band))
    rest = layout & ~_in_band(n, band)  # (heads, n, n): kept blocks outside the band
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
    band = _band(layout)
    rest = layout & ~_in_band(n, band)
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


def windowed_walk(layout: torch.Tensor, block: int) -> Windows | None:
    """The :func:`local_windows` the kernel walks instead of its rows: where the rows would
    recompute their probabilities (wider than :data:`SAVED_COLUMNS`) and the windows compute no
    more slots than the row walk computes plus ``GATHER_COST`` for each block it gathers. fixed
    at 8k tokens (local 4, global 1, block 64): as many slots as runs of 4 rows, none gathered."""
    if saved_probability_columns(row_slots(layout)[0].shape[-1], block) > 0:
        return None
    windows = local_windows(layout)
    if windows is None:
        return None
    computed, gathered = _row_walk(layout, block)
    heads, n, _ = layout.shape
    return windows if heads * windows.computed(n) <= computed + GATHER_COST * gathered else None


def _row_walk(layout: torch.Tensor, block: int) -> tuple[int, int]:
    """Slots the row walk computes (each row its band and its run's slots up to the run's longest
    row's last) and blocks it gathers (each run's, once), with :func:`shared_run`'s run."""
    heads, n, _ = layout.shape
    run = shared_run(layout, block)
    index, valid, band = row_slots(layout, run)
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

    On CPU, loom's kernel (:mod:`loom.model.block_sparse`): a layout of local windows and shared
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
    layout = torch.stack([_head(config, h, n) for h in range(heads)]).bool() | torch.eye(n, dtype=torch.bool)
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
    return row_slots(torch.stack([_head(config, h, n) for h in range(heads)]))[0].shape[-1]


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


def density(layout: torch.Tensor) -> float:
    """The fraction of blocks a layout keeps (of all, including the future a decoder never sees)."""
    return layout.float().mean().item()


def _head(c: SparsityConfig, h: int, n: int) -> torch.Tensor:
    i = torch.arange(n).view(n, 1)  # query blocks (rows)
    j = torch.arange(n).view(1, n)  # key blocks (columns)
    mode = c.mode
    if mode == "dense":
        keep = torch.ones(n, n, dtype=torch.bool)
    elif mode == "fixed":
        keep = _fixed(c, h, n, i, j)
    elif mode == "strided":
        stride = c.stride_blocks or c.num_local_blocks
        gap = (i - j).abs()
        keep = (gap < c.num_local_blocks) | (gap % stride == 0)
    elif mode == "sliding_window":
        keep = (i - j).abs() <= c.num_sliding_window_blocks // 2
    elif mode in ("bslongformer", "longformer"):
        gap = (i - j).abs()
        keep = (gap % c.dilation == 0) & (gap <= c.dilation * (c.num_sliding_window_blocks // 2))
        keep |= _global(c, n, i, j, horizontal=True)
    elif mode == "bigbird":
        w = c.num_sliding_window_blocks // 2
        keep = ((i - j).abs() <= w) | (i < c.num_global_blocks) | (j < c.num_global_blocks)
        keep |= _random(c, h, n)
    else:  # variable
        keep = _windows(c.local_window_blocks, n, i, j) | _global(c, n, i, j, c.horizontal_global_attention)
        keep |= _random(c, h, n)
    if c.attention == "unidirectional":
        keep &= j <= i
    return keep | torch.eye(n, dtype=torch.bool)  # every block attends itself


def _fixed(c: SparsityConfig, h: int, n: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    size, g = c.num_local_blocks, c.num_global_blocks
    keep = (i // size) == (j // size)
    first = size - (1 + h % c.num_different_global_patterns) * g  # the summary's position in a window
    summary = torch.zeros(n, dtype=torch.bool)
    for start in range(0, n, size):
        if start + size <= n:
            lo = start + first
        else:  # a short last window: its summary as far along as it fits
            lo = min(start + first, n - g)
        summary[lo : lo + g] = True
    keep = keep | summary.view(1, n)
    if c.horizontal_global_attention:
        keep = keep | summary.view(n, 1)
    return keep


def _windows(sizes: list[int], n: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Block i and j in one local window; windows of ``sizes`` in order, the last size repeating."""
    window = torch.empty(n, dtype=torch.long)
    start, index, k = 0, 0, 0
    while start < n:
        size = sizes[min(k, len(sizes) - 1)]
        window[start : start + size] = index
        start, index, k = start + size, index + 1, k + 1
    return window.view(n, 1) == window.view(1, n)


def _global(c: SparsityConfig, n: int, i: torch.Tensor, j: torch.Tensor, horizontal: bool) -> torch.Tensor:
    is_global = torch.zeros(n, dtype=torch.bool)
    ends = c.global_block_end_indices or [start + 1 for start in c.global_block_indices]
    for start, end in zip(c.global_block_indices, ends):
        is_global[start : min(end, n)] = True
    keep = is_global.view(1, n).expand(n, n)
    return keep | is_global.view(n, 1) if horizontal else keep


def _random(c: SparsityConfig, h: int, n: int) -> torch.Tensor:
    """``num_random_blocks`` distinct columns per row (among j <= i for a decoder), seeded by (seed, head)."""
    count = c.random_blocks()
    keep = torch.zeros(n, n, dtype=torch.bool)
    if not count:
        return keep
    gen = torch.Generator().manual_seed(stream_seed(c.seed, "sparsity-random", h) % (2**63))
    for row in range(n):
        span = row + 1 if c.attention == "unidirectional" else n
        keep[row, torch.randperm(span, generator=gen)[: min(count, span)]] = True
    return keep


def _fail(name: str, value: object, why: str, fix: str) -> None:
    raise LoomError(f"model.sparse_attention.{name} = {value!r} {why}.", fix)


def _positive(name: str, value: int) -> None:
    if value <= 0:
        _fail(name, value, "must be positive", f"set model.sparse_attention.{name} above zero.")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, f"is not one of {', '.join(choices)}", f"set model.sparse_attention.{name} to one of them.")


def _divisor_near(n: int, want: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - want), d))
