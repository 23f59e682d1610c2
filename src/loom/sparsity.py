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

from dataclasses import dataclass, field

import torch

from loom.errors import LoomError
from loom.parallel.random import stream_seed

MODES = ("dense", "fixed", "strided", "sliding_window", "bslongformer", "longformer", "bigbird", "variable")
DIRECTIONS = ("unidirectional", "bidirectional")
# which kernel runs a layout off CUDA (on CUDA: FlexAttention): "cpp" loom's compiled one
# (loom.model.block_sparse_cpp), "torch" the one of torch ops (loom.model.block_sparse), "auto"
# the compiled one where this machine builds it, else torch's with a warning
KERNELS = ("auto", "cpp", "torch")


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
    kernel: str = "auto"  # loom's, not DeepSpeed's: KERNELS above

    def random_blocks(self) -> int:
        if self.num_random_blocks is not None:
            return self.num_random_blocks
        return 1 if self.mode == "bigbird" else 0

    def validate(self, seq_len: int | None = None) -> None:
        """Raise a :class:`LoomError` naming the field and the fix; with ``seq_len``, the fields
        that depend on the number of blocks too."""
        _choice("mode", self.mode, MODES)
        _choice("attention", self.attention, DIRECTIONS)
        _choice("kernel", self.kernel, KERNELS)
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
    layout = torch.stack([head_layout(config, h, blocks) for h in range(heads)])
    if heads == 1:
        layout = layout.expand(num_heads, blocks, blocks).clone()
    return layout


def density(layout: torch.Tensor) -> float:
    """The fraction of blocks a layout keeps (of all, including the future a decoder never sees)."""
    return layout.float().mean().item()


def head_layout(c: SparsityConfig, h: int, n: int) -> torch.Tensor:
    """Head ``h``'s layout ``(n, n)`` over ``n`` blocks (bool), decoder-causal where the config says."""
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
