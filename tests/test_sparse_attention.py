"""Block-sparse attention: each layout against its definition (written out here, not by calling the
builder), the kernel against dense attention under the same mask, forward and backward, and
bad parameters named with their fix."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SPARSE_LAYOUTS, tiny_overrides, train_rank

from loom.attention_walk import local_windows, row_slots
from loom.config import load_config
from loom.distributed.spawn import run_ranks
from loom.errors import LoomError
from loom.model.block_sparse import Slots, block_sparse_attention, dense_mask
from loom.model.transformer import Transformer
from loom.sparsity import SparsityConfig, density, make_layout


def _layout(heads: int = 1, seq: int = 16 * 8, **params) -> torch.Tensor:
    return make_layout(SparsityConfig(**params), heads, seq)


def _expected(n: int, keep) -> torch.Tensor:  # noqa: ANN001
    """A layout cell by cell from ``keep(i, j)``, decoder-causal, the diagonal always kept."""
    return torch.tensor([[bool(keep(i, j)) and j <= i or i == j for j in range(n)] for i in range(n)])


def test_dense_keeps_every_past_block() -> None:
    assert torch.equal(_layout(mode="dense")[0], _expected(8, lambda i, j: True))


def test_fixed_local_windows_and_summary_columns() -> None:
    # windows of 4 blocks: {0..3}, {4..7}; the last block of each (3, 7) is every later row's summary
    got = _layout(mode="fixed", num_local_blocks=4, num_global_blocks=1)[0]
    assert torch.equal(got, _expected(8, lambda i, j: i // 4 == j // 4 or j in (3, 7)))


def test_fixed_heads_take_different_summaries() -> None:
    got = _layout(
        heads=2,
        mode="fixed",
        num_local_blocks=4,
        num_global_blocks=2,
        different_layout_per_head=True,
        num_different_global_patterns=2,
    )
    assert torch.equal(got[0], _expected(8, lambda i, j: i // 4 == j // 4 or j in (2, 3, 6, 7)))
    assert torch.equal(got[1], _expected(8, lambda i, j: i // 4 == j // 4 or j in (0, 1, 4, 5)))


def test_strided_band_and_every_stride_th_block() -> None:
    got = _layout(mode="strided", num_local_blocks=2, stride_blocks=3)[0]
    assert torch.equal(got, _expected(8, lambda i, j: i - j < 2 or (i - j) % 3 == 0))


def test_sliding_window() -> None:
    got = _layout(mode="sliding_window", num_sliding_window_blocks=5)[0]
    assert torch.equal(got, _expected(8, lambda i, j: abs(i - j) <= 2))


@pytest.mark.parametrize("mode", ["bslongformer", "longformer"])
def test_longformer_window_with_dilation_and_global_blocks(mode: str) -> None:
    got = _layout(mode=mode, num_sliding_window_blocks=5, dilation=2, global_block_indices=[1])[0]
    assert torch.equal(got, _expected(8, lambda i, j: (abs(i - j) in (0, 2, 4)) or j == 1 or i == 1))
    ranged = _layout(mode=mode, num_sliding_window_blocks=1, global_block_indices=[2], global_block_end_indices=[4])
    assert torch.equal(ranged[0], _expected(8, lambda i, j: i == j or j in (2, 3) or i in (2, 3)))


def test_bigbird_window_global_and_seeded_random_blocks() -> None:
    got = _layout(heads=4, mode="bigbird", different_layout_per_head=True, num_random_blocks=2, seed=7)
    base = _expected(8, lambda i, j: abs(i - j) <= 1 or i == 0 or j == 0)
    for head in got:
        assert (head & base).equal(base)  # the window and the global block are there
        extra = head & ~base
        assert all(int(extra[i].sum()) <= 2 for i in range(8))  # at most two random blocks a row
        assert not head.triu(1).any()  # never the future
    assert not torch.equal(got[1], got[2])  # each head draws its own
    again = _layout(heads=4, mode="bigbird", different_layout_per_head=True, num_random_blocks=2, seed=7)
    assert torch.equal(got, again)  # the same draw on every rank, every run


def test_variable_windows_of_several_sizes_and_global_ranges() -> None:
    got = _layout(mode="variable", local_window_blocks=[1, 2, 3], global_block_indices=[0], num_random_blocks=0)[0]
    window = [0, 1, 1, 2, 2, 2, 3, 3]  # sizes 1, 2, 3, then 3 repeating
    assert torch.equal(got, _expected(8, lambda i, j: window[i] == window[j] or j == 0))


@pytest.mark.parametrize(
    ("params", "seq", "match"),
    [
        ({"block": 48}, 128, "does not divide the sequence length 128"),
        ({"mode": "sliding_window", "num_sliding_window_blocks": 9}, 128, "wider than the sequence's 8 blocks"),
        ({"mode": "fixed", "num_local_blocks": 3, "num_global_blocks": 2}, 128, "not a multiple"),
        ({"mode": "fixed", "num_different_global_patterns": 2}, 128, "different_layout_per_head"),
        ({"horizontal_global_attention": True}, 128, "bidirectional"),
        ({"mode": "longformer", "global_block_indices": [9]}, 128, "outside the sequence's 8 blocks"),
        ({"mode": "bigbird", "num_random_blocks": 9}, 128, "num_random_blocks"),
        ({"mode": "sparse"}, 128, "sparse_attention.mode"),
    ],
)
def test_bad_parameters_are_named_with_their_fix(params: dict, seq: int, match: str) -> None:
    with pytest.raises(LoomError, match=match) as err:
        make_layout(SparsityConfig(**params), 2, seq)
    assert err.value.fix


def test_density_falls_with_the_window() -> None:
    narrow = density(_layout(mode="sliding_window", num_sliding_window_blocks=3, seq=16 * 64))
    wide = density(_layout(mode="sliding_window", num_sliding_window_blocks=9, seq=16 * 64))
    assert narrow < wide < 0.2


def _reference(q, k, v, layout, block):  # noqa: ANN001, ANN202
    mask = dense_mask(layout, block)  # (heads, S, S), causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0))


def _assert_equals_dense(slots: Slots, layout: torch.Tensor, batch: int, heads: int, seq: int, d: int) -> None:
    """The kernel under ``slots`` against dense attention under the layout's mask, forward and
    backward, on random float64 inputs (1e-10)."""
    q, k, v = (torch.randn(batch, heads, seq, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = block_sparse_attention(q, k, v, slots)
    want = _reference(q, k, v, layout, slots.block)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(got)
    for a, b, name in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad), "qkv"):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("params", SPARSE_LAYOUTS, ids=lambda p: p["mode"])
def test_kernel_equals_dense_attention_under_the_mask(params: dict) -> None:
    torch.manual_seed(0)
    batch, heads, block, n, d = 2, 3, 8, 7, 16
    layout = make_layout(SparsityConfig(block=block, **params), heads, block * n)
    q, k, v = (torch.randn(batch, heads, block * n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = block_sparse_attention(q, k, v, Slots.of(layout, block))
    want = _reference(q, k, v, layout, block)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(got)
    mine = torch.autograd.grad(got, (q, k, v), grad)
    theirs = torch.autograd.grad(want, (q, k, v), grad)
    for a, b, name in zip(mine, theirs, "qkv"):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize(
    "params",
    [
        {"mode": "fixed", "num_local_blocks": 2, "num_different_global_patterns": 2, "different_layout_per_head": True},
        {"mode": "bigbird", "different_layout_per_head": True, "num_random_blocks": 2, "seed": 1},
    ],
    ids=lambda p: p["mode"],
)
@pytest.mark.parametrize("saved", [True, False], ids=["probabilities kept", "recomputed"])
@pytest.mark.parametrize("by_length", [False, True], ids=["stack order", "sorted by length"])
@pytest.mark.parametrize("run", [1, 2, 4], ids=lambda r: f"run {r}")
def test_kernel_in_many_row_groups_and_chunks_equals_dense_attention(
    params: dict, saved: bool, by_length: bool, run: int, monkeypatch
) -> None:  # noqa: ANN001
    """Tiles small enough that the rows go in many groups, each walking its own longest row's slots
    (kept probabilities: in one tile; recomputed: the band, then the rest a few slots at a time, with
    the online softmax across chunks), padding inside a group, groups across heads and batches; in
    the stack's order the band read as a view except in the first group, sorted by length the
    query-side arrays permuted there and back and the band gathered; with runs of rows sharing
    their gathered blocks, each run's queries multiplied at once and the rows' own blocks masked."""
    from loom import attention_walk
    from loom.model import block_sparse

    monkeypatch.setattr(block_sparse, "TILE_BYTES", 5 * 8 * 16 * 4)  # 5 rows a group (16 columns)
    monkeypatch.setattr(block_sparse, "CHUNK_COLUMNS", 16)  # 2 key blocks of 8 per chunk
    monkeypatch.setattr(block_sparse, "SORTED_GAIN", -1.0 if by_length else 1.0)  # always / never sorted
    monkeypatch.setattr(attention_walk, "SAVED_COLUMNS", 512 if saved else 0)
    torch.manual_seed(0)
    batch, heads, block, n, d = 2, 3, 8, 12, 16
    layout = make_layout(SparsityConfig(block=block, **params), heads, block * n)
    slots = Slots.of(layout, block, run=run, walk="rows")
    assert slots.width >= 5 and len(set(slots.valid.sum(-1).reshape(-1).tolist())) > 2  # skewed rows
    plan = block_sparse._Plan.of(*slots.rows(batch), slots.band, block, run)
    assert (plan.order is not None) == by_length
    assert all(g.start % run == 0 and g.stop % run == 0 for g in plan.groups)  # whole runs a group
    if by_length:  # the walk goes through the rows shortest first, each once, each run's rows together
        assert sorted(plan.order.tolist()) == list(range(batch * heads * n)) and plan.widths == sorted(plan.widths)
        assert torch.equal(
            plan.order.view(-1, run) - plan.order.view(-1, run)[:, :1],
            torch.arange(run).expand(len(plan.order) // run, run),
        )
    _assert_equals_dense(slots, layout, batch, heads, block * n, d)


@pytest.mark.parametrize("attention", ["unidirectional", "bidirectional"])
def test_key_gradients_written_in_place_or_accumulated_over_zeros(attention: str, monkeypatch) -> None:  # noqa: ANN001
    """A causal layout's rows write their diagonal's key and value gradients first (no pass of zeros
    before); a bidirectional one, whose rows also read later blocks, accumulates over zeros. Both equal
    dense attention under the same mask, over several row groups in the stack's order."""
    from loom.model import block_sparse

    monkeypatch.setattr(block_sparse, "TILE_BYTES", 3 * 8 * 40 * 4)  # 3 rows a group
    monkeypatch.setattr(block_sparse, "SORTED_GAIN", 1.0)  # the stack's order: the band read as a view
    torch.manual_seed(4)
    batch, heads, block, n, d = 2, 2, 8, 10, 16
    config = SparsityConfig(mode="bigbird", block=block, num_random_blocks=1, attention=attention, seed=2)
    layout = make_layout(config, heads, block * n)
    slots = Slots.of(layout, block)
    assert slots.lower == (attention == "unidirectional")
    causal = attention == "unidirectional"
    q, k, v = (torch.randn(batch, heads, block * n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = block_sparse_attention(q, k, v, slots, causal=causal)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(layout, block, causal=causal).unsqueeze(0))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(got)
    for a, b, name in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad), "qkv"):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_a_skewed_layout_walks_its_rows_sorted_by_length_a_uniform_one_in_place() -> None:
    """fixed's rows grow with their summary columns: walked in the stack's order its groups of 16
    rows compute 17% more slots than the rows have; sorted by length, none more (and the window,
    every row alike, keeps the stack's order and its band view)."""
    from loom.model import block_sparse

    def computed(params: dict) -> tuple[bool, float]:
        slots = Slots.of(make_layout(SparsityConfig(block=64, **params), 8, 8192), 64, run=1)
        plan = block_sparse._Plan.of(*slots.rows(1), slots.band, 64)
        work = sum((g.stop - g.start) * w for g, w in zip(plan.groups, plan.widths, strict=True))
        return plan.order is not None, work / int(slots.valid.sum())

    by_length, extra = computed({"mode": "fixed", "num_local_blocks": 4, "num_global_blocks": 1})
    assert by_length and extra < 1.01
    assert computed({"mode": "sliding_window", "num_sliding_window_blocks": 3}) == (False, pytest.approx(1.0, abs=0.01))


@pytest.mark.parametrize(
    "params",
    [
        {"mode": "sliding_window", "num_sliding_window_blocks": 3},
        {"mode": "fixed", "num_local_blocks": 4},
        {"mode": "bigbird", "different_layout_per_head": True, "num_random_blocks": 2},
        {"mode": "dense"},
    ],
    ids=lambda p: p["mode"],
)
def test_row_slots_hold_each_kept_block_once_the_band_first(params: dict) -> None:
    heads, n = 3, 16
    layout = make_layout(SparsityConfig(block=8, **params), heads, 8 * n)
    index, valid, band = row_slots(layout)
    kept = layout | torch.eye(n, dtype=torch.bool)
    counts = torch.zeros(heads, n, n, dtype=torch.long).scatter_add_(2, index, valid.long())
    assert torch.equal(counts, kept.long())  # every kept block once, nothing else
    rows = torch.arange(n).view(n, 1)
    assert torch.equal(index[..., :band], (rows - band + 1 + torch.arange(band)).clamp(min=0).expand(heads, n, band))
    assert valid[:, :, band - 1].all()  # the diagonal, last in the band
    if params["mode"] == "sliding_window":
        assert (band, index.shape[-1]) == (2, 2)  # the window is the band: nothing gathered
    assert valid[..., :band].all(-1).float().mean() >= 1 / 1.3  # most rows have the whole band


@pytest.mark.parametrize("run", [2, 4])
def test_runs_of_rows_share_the_union_of_their_gathered_blocks(run: int) -> None:
    """With ``run``, the slots past the band are the same for the rows of an aligned run: the union
    of what they keep there, ascending; each row's ``valid`` marks its own, so every kept block is
    still valid once in its row, and the band is as without runs."""
    heads, n = 3, 16
    config = SparsityConfig(
        mode="fixed", block=8, num_local_blocks=4, num_different_global_patterns=2, different_layout_per_head=True
    )
    layout = make_layout(config, heads, 8 * n)
    index, valid, band = row_slots(layout, run)
    alone, alone_valid, alone_band = row_slots(layout)
    assert band == alone_band and torch.equal(index[..., :band], alone[..., :band])
    kept = layout | torch.eye(n, dtype=torch.bool)
    counts = torch.zeros(heads, n, n, dtype=torch.long).scatter_add_(2, index, valid.long())
    assert torch.equal(counts, kept.long())
    rest = index[..., band:].reshape(heads, n // run, run, -1)
    assert torch.equal(rest, rest[:, :, :1].expand_as(rest))  # one list for the run's rows
    for h in range(heads):
        for first in range(0, n, run):
            union = sorted(
                {int(j) for i in range(first, first + run) for j in alone[h, i, band:][alone_valid[h, i, band:]]}
            )
            got = index[h, first, band:][: len(union)].tolist()
            assert got == union and not valid[h, first : first + run, band + len(union) :].any()
    with pytest.raises(ValueError, match="does not divide"):
        row_slots(layout, 3)


def test_fixed_layouts_summary_columns_are_gathered_once_a_run_a_random_layouts_per_row() -> None:
    """fixed's rows of a window share their summary columns: at 8k tokens (local 4, global 1, block
    64) runs of 4 rows compute 8% more slots than the rows keep and gather 3.7x fewer blocks; BigBird's
    random blocks differ from row to row, the window has nothing past its band: one row a run."""
    from loom.attention_walk import shared_run

    layout = make_layout(SparsityConfig(block=64, mode="fixed", num_local_blocks=4, num_global_blocks=1), 8, 8192)
    assert shared_run(layout, 64) == 4
    slots, alone = Slots.of(layout, 64, walk="rows"), Slots.of(layout, 64, run=1, walk="rows")
    gathered = int(slots.valid[:, :, slots.band :].view(8, 32, 4, -1).any(2).sum())  # each run's blocks, once
    computed = slots.band * 8 * 128 + 4 * gathered  # the band per row, the run's blocks for each of its rows
    assert computed / int(alone.valid.sum()) == pytest.approx(1.083, abs=0.01)
    assert int(alone.valid[..., alone.band :].sum()) / gathered == pytest.approx(3.66, abs=0.05)
    for params in (
        {"mode": "bigbird", "num_random_blocks": 1},
        {"mode": "sliding_window", "num_sliding_window_blocks": 3},
    ):
        assert shared_run(make_layout(SparsityConfig(block=64, **params), 8, 8192), 64) == 1


@pytest.mark.parametrize(
    "params, run, walk",
    [
        ({"mode": "bigbird", "num_random_blocks": 1}, 1, "rows"),
        ({"mode": "fixed", "num_local_blocks": 4}, 4, "rows"),
        ({"mode": "fixed", "num_local_blocks": 4}, 1, "windows"),
    ],
    ids=["bigbird", "fixed, runs of 4, recomputed", "fixed, window by window"],
)
def test_kernel_in_bf16_keeps_its_statistics_in_fp32(params: dict, run: int, walk: str, monkeypatch) -> None:  # noqa: ANN001
    from loom import attention_walk

    if params["mode"] == "fixed":
        monkeypatch.setattr(attention_walk, "SAVED_COLUMNS", 0)  # the online softmax: runs or windows
    torch.manual_seed(2)
    block, n = 16, 8
    layout = make_layout(SparsityConfig(block=block, **params), 2, block * n)
    q, k, v = (torch.randn(1, 2, block * n, 32) for _ in range(3))
    half = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    slots = Slots.of(layout, block, run=run, walk="rows")
    if walk == "windows":  # at this size the rows compute fewer slots: the windows asked for
        slots = dataclasses.replace(slots, windows=local_windows(layout))
    got = block_sparse_attention(*half, slots)
    assert got.dtype == torch.bfloat16
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _reference(*full, layout, block)
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.02)
    grad = torch.randn_like(want)
    got.backward(grad.bfloat16())
    want.backward(grad)
    for a, b in zip(half, full):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=0.05, atol=0.05)


def _fixed_windows(n: int, size: int, globals_: int, patterns: int, heads: int) -> tuple[list[list[int]], list[int]]:
    """fixed's shared columns written out: head h's summary blocks start ``size - (1 + h % patterns)
    x globals_`` into each whole window; a column is shared where it lies before a later window."""
    starts = list(range(0, n, size))
    columns = []
    for h in range(heads):
        first = size - (1 + h % patterns) * globals_
        summary = [w + first + g for w in starts if w + size <= n for g in range(globals_)]
        columns.append([c for c in summary if c < starts[-1]])
    before = [sum(c < w for c in columns[0]) for w in starts]
    return columns, before


@pytest.mark.parametrize(
    "params, n, size",
    [
        ({"mode": "fixed", "num_local_blocks": 4}, 16, 4),
        ({"mode": "fixed", "num_local_blocks": 3}, 14, 3),  # a short last window
        (
            {"mode": "fixed", "num_local_blocks": 4, "num_global_blocks": 2, "num_different_global_patterns": 2}
            | {"different_layout_per_head": True},
            14,
            4,
        ),
    ],
    ids=["fixed", "short last window", "two global patterns"],
)
def test_local_windows_find_fixeds_windows_and_summary_columns(params: dict, n: int, size: int) -> None:
    heads = 3
    windows = local_windows(make_layout(SparsityConfig(block=8, **params), heads, 8 * n))
    columns, before = _fixed_windows(
        n, size, params.get("num_global_blocks", 1), params.get("num_different_global_patterns", 1), heads
    )
    assert windows is not None and windows.size == size
    assert windows.columns.tolist() == columns and list(windows.before) == before
    # each window's rows against their whole window and the columns before it
    starts = range(0, n, size)
    assert windows.computed(n) == sum(min(size, n - w) * (min(size, n - w) + b) for w, b in zip(starts, before))


def test_local_windows_of_global_blocks_beside_aligned_windows_and_of_layouts_without() -> None:
    variable = SparsityConfig(
        block=8, mode="variable", local_window_blocks=[2], global_block_indices=[0], num_random_blocks=0
    )
    windows = local_windows(make_layout(variable, 2, 8 * 10))
    assert windows.size == 2 and windows.columns.tolist() == [[0], [0]] and windows.before == (0, 1, 1, 1, 1)
    for params in (
        {"mode": "sliding_window", "num_sliding_window_blocks": 3},  # windows not aligned
        {"mode": "strided", "num_local_blocks": 2, "stride_blocks": 3},
        {"mode": "bigbird", "num_random_blocks": 1},
        {"mode": "bslongformer", "num_sliding_window_blocks": 3},
        {"mode": "fixed", "num_local_blocks": 4, "attention": "bidirectional"},  # blocks past the diagonal
    ):
        assert local_windows(make_layout(SparsityConfig(block=8, **params), 2, 8 * 12)) is None, params
    fixed = make_layout(SparsityConfig(block=8, mode="fixed", num_local_blocks=4), 2, 8 * 12)
    lacking = fixed.clone()
    lacking[1, 9, 3] = False  # one row of head 1 without a summary column the others keep
    assert local_windows(lacking) is None
    lacking = fixed.clone()
    lacking[0, 6, 5] = False  # a row without part of its window
    assert local_windows(lacking) is None


@pytest.mark.parametrize(
    "params, n",
    [
        ({"mode": "fixed", "num_local_blocks": 4}, 12),
        ({"mode": "fixed", "num_local_blocks": 3}, 14),
        (
            {"mode": "fixed", "num_local_blocks": 4, "num_global_blocks": 2, "num_different_global_patterns": 2}
            | {"different_layout_per_head": True},
            14,
        ),
        ({"mode": "variable", "local_window_blocks": [2], "global_block_indices": [0, 3], "num_random_blocks": 0}, 12),
        ({"mode": "dense"}, 9),  # windows of one block: every earlier block a shared column
        ({"mode": "variable", "local_window_blocks": [3], "global_block_indices": [], "num_random_blocks": 0}, 10),
    ],
    ids=["fixed", "short last window", "two global patterns", "variable", "dense", "windows alone"],
)
@pytest.mark.parametrize("tiles", ["whole", "small"])
def test_windowed_kernel_equals_dense_attention(params: dict, n: int, tiles: str, monkeypatch) -> None:  # noqa: ANN001
    """Window by window (its queries, keys and values as views, the shared columns gathered once
    a call and read as a prefix) equals dense attention under the mask, forward and backward; with
    small tiles a window's heads go a few at a time and its columns a block at a time."""
    from loom.model import block_sparse

    if tiles == "small":
        monkeypatch.setattr(block_sparse, "TILE_BYTES", 2 * 32 * 32 * 4)  # 2 heads of a window at a time
        monkeypatch.setattr(block_sparse, "CHUNK_COLUMNS", 8)  # one column block a chunk
    torch.manual_seed(5)
    batch, heads, block, d = 2, 3, 8, 16
    layout = make_layout(SparsityConfig(block=block, **params), heads, block * n)
    windows = local_windows(layout)  # asked for: at these sizes the rows compute fewer slots
    slots = dataclasses.replace(Slots.of(layout, block, walk="rows"), windows=windows)
    _assert_equals_dense(slots, layout, batch, heads, block * n, d)


def test_fixed_walks_its_windows_where_rows_recompute_and_nothing_else_does() -> None:
    """fixed at 8k tokens (local 4, global 1, block 64): window by window it computes what the row
    walk's runs of 4 compute (4 x (4 + w) slots in window w) and gathers nothing per row; at 1k its
    rows keep their probabilities, which the windows do not, so the rows go; BigBird, the window and
    a layout asked for its rows have no windows."""
    from loom.attention_walk import _row_walk, windowed_walk

    fixed = make_layout(SparsityConfig(block=64, mode="fixed", num_local_blocks=4, num_global_blocks=1), 8, 8192)
    windows = windowed_walk(fixed, 64)
    assert windows is not None and 8 * windows.computed(128) == 8 * sum(4 * (4 + w) for w in range(32)) == 19968
    assert _row_walk(fixed, 64)[0] == 19968  # runs of 4 rows, which still gather their blocks
    assert Slots.of(fixed, 64).windows is not None and Slots.of(fixed, 64, walk="rows").windows is None
    short = make_layout(SparsityConfig(block=64, mode="fixed", num_local_blocks=4, num_global_blocks=1), 8, 1024)
    assert windowed_walk(short, 64) is None
    for params in (
        {"mode": "bigbird", "num_random_blocks": 1},
        {"mode": "sliding_window", "num_sliding_window_blocks": 3},
    ):
        assert windowed_walk(make_layout(SparsityConfig(block=64, **params), 8, 8192), 64) is None
    with pytest.raises(ValueError, match="walk"):
        Slots.of(fixed, 64, walk="windows")


def test_the_walk_weighs_the_row_walk_it_is_given_as_the_one_it_builds() -> None:
    """Slots.of hands windowed_walk the row walk it built (shared_run's run): the same choice as
    windowed_walk building it again; a run the caller forces is not that walk, so it is not handed."""
    from loom.attention_walk import _row_walk, row_slots, shared_run, windowed_walk

    for params, seq in (
        ({"mode": "fixed", "num_local_blocks": 4, "num_global_blocks": 1}, 8192),
        ({"mode": "fixed", "num_local_blocks": 16, "num_global_blocks": 2}, 8192),
        ({"mode": "fixed", "num_local_blocks": 4, "num_global_blocks": 1}, 1024),
        ({"mode": "bigbird", "num_random_blocks": 1}, 4096),
    ):
        layout = make_layout(SparsityConfig(block=64, **params), 8, seq)
        run = shared_run(layout, 64)
        rows = (run, *row_slots(layout, run))
        assert _row_walk(layout, 64, rows) == _row_walk(layout, 64)
        alone, given = windowed_walk(layout, 64), windowed_walk(layout, 64, rows)
        assert (alone is None) == (given is None) and (alone is None or alone.size == given.size)
        assert (Slots.of(layout, 64).windows is None) == (alone is None)
        assert Slots.of(layout, 64, run=1).windows is None or alone is not None


@pytest.mark.parametrize(("kernel", "compiled"), [("cpp", "kept"), ("torch", "slots")])
def test_a_models_layers_share_one_layout_compiled_once_per_length(kernel: str, compiled: str) -> None:
    """Every layer attends under the same layout: the model builds it once for this rank's heads
    and compiles it once per sequence length (for the kernel it runs), whichever layer meets that
    length first."""
    items = ["model.n_layers=3", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", "model.max_seq_len=128"]
    items += ['model.attention="sparse"', 'model.sparse_attention.mode="bigbird"', "model.sparse_attention.block=8"]
    items.append(f'model.sparse_attention.kernel="{kernel}"')
    items.append("model.sparse_attention.different_layout_per_head=true")
    model = Transformer(load_config(None, items).model, seed=1)
    shared = {id(b.attn.sparse) for b in model.blocks.values()}
    assert len(shared) == 1
    sparse = model.blocks["0"].attn.sparse
    config = load_config(None, items).model
    torch.testing.assert_close(sparse.layout, make_layout(config.sparse_attention, 4, 128))
    x = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(0))
    model.loss(x, x).backward()
    short = x[:, :64].contiguous()
    model.loss(short, short)
    assert sorted(key[:2] for key in sparse._compiled) == [(compiled, 8), (compiled, 16)]
    assert sparse.slots(64, x.device) is sparse.slots(64, x.device)
    assert sparse.kept(64) is sparse.kept(64)
    torch.testing.assert_close(sparse.corner(64), sparse.layout[:, :8, :8])


def test_a_fixed_model_trains_the_same_window_by_window_as_row_by_row(monkeypatch) -> None:  # noqa: ANN001
    from loom.model import block_sparse

    items = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", "model.max_seq_len=128"]
    items += ['model.attention="sparse"', 'model.sparse_attention.mode="fixed"', "model.sparse_attention.block=8"]
    items.append('model.sparse_attention.kernel="torch"')  # the walks are the torch-ops kernel's
    x = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for walk in ("windows", "rows"):  # each asked for (at this size the rows compute fewer slots)
        chosen = local_windows if walk == "windows" else lambda layout: None
        monkeypatch.setattr(block_sparse, "windowed_walk", lambda layout, block, rows=None, c=chosen: c(layout))
        model = Transformer(load_config(None, items).model, seed=1)
        loss = model.loss(x, x)
        loss.backward()
        walked = [m.sparse.slots(128, x.device) for m in model.modules() if getattr(m, "sparse", None)]
        assert walked and all((s.windows is not None) == (walk == "windows") for s in walked)
        losses.append(loss)
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_in_fp32_and_its_tiles_follow_the_blocks_kept(monkeypatch) -> None:  # noqa: ANN001
    from loom.model import block_sparse

    monkeypatch.setattr(block_sparse, "TILE_BYTES", 4 * 16 * 32 * 4)  # groups of 4 rows: the band read as a view
    torch.manual_seed(1)
    block, n = 16, 16
    layout = make_layout(SparsityConfig(mode="sliding_window", block=block, num_sliding_window_blocks=3), 2, block * n)
    slots = Slots.of(layout, block)
    assert (slots.band, slots.width) == (2, 2)  # the causal window (the block and the one before): a view
    qkv = torch.randn(3, 1, 2, block * n, 32, requires_grad=True)
    q, k, v = qkv.unbind(0)  # contiguous views at offsets into one storage, as a fused projection gives
    got = block_sparse_attention(q, k, v, slots)
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = _reference(*ref, layout, block)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    for mine, theirs in zip(qkv.grad.unbind(0), ref):
        torch.testing.assert_close(mine, theirs.grad, rtol=1e-5, atol=1e-5)
    assert math.isclose(density(layout), (2 * n - 1) / n**2)


# ----------------------------------------------------------------------------- in the model


def _sparse_items(corpus, **extra) -> list[str]:  # noqa: ANN001
    items = {
        "model.attention": "sparse",
        "model.sparse_attention.block": 8,
        "model.n_layers": 2,
        "train.steps": 4,
        "train.global_batch": 4,
        "train.eval_every": 0,
        "train.ckpt_every": 0,
        **extra,
    }
    return tiny_overrides(corpus, **items)


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_a_model_with_the_dense_layout_equals_the_dense_model(kernel: str) -> None:
    base = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", 'model.family="llama"']
    base.append("model.n_kv_heads=2")
    dense = Transformer(load_config(None, base).model, seed=1)
    sparse_items = [*base, 'model.attention="sparse"', 'model.sparse_attention.mode="dense"']
    sparse_items.append(f'model.sparse_attention.kernel="{kernel}"')
    sparse = Transformer(load_config(None, sparse_items).model, seed=1)
    x = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    a, b = dense.loss(x, x), sparse.loss(x, x)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    a.backward()
    b.backward()
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "kind",
    [
        # each tp rank takes its heads' layouts: bigbird draws a different layout for every head
        {"model.sparse_attention.mode": "bigbird", "model.sparse_attention.different_layout_per_head": True},
        {  # the torch-ops kernel, as the C++ one above
            "model.sparse_attention.mode": "bigbird",
            "model.sparse_attention.different_layout_per_head": True,
            "model.sparse_attention.kernel": "torch",
        },
        # rotations drawn for every head from the shared stream, each rank keeping its heads'
        {"model.attention": "lsh", "model.lsh_chunk": 8, "model.lsh_buckets": 4, "model.family": "llama"},
    ],
    ids=["bigbird", "bigbird, torch-ops kernel", "lsh shared-QK"],
)
def test_tp2_sparse_model_matches_the_single_process(tmp_path: Path, text_corpus: Path, kind: dict) -> None:
    one = train_rank(_sparse_items(text_corpus, **kind), str(tmp_path / "one"))
    items = _sparse_items(text_corpus, **kind, **{"parallel.tp": 2, "parallel.sequence_parallel": True})
    two = run_ranks(train_rank, 2, args=(items, str(tmp_path / "tp2")), timeout_s=200)[0]
    for a, b in zip(two, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("mode", ["fixed", "bigbird", "bslongformer", "variable"])
def test_each_layout_trains(tmp_path: Path, text_corpus: Path, mode: str) -> None:
    records = train_rank(
        _sparse_items(text_corpus, **{"model.sparse_attention.mode": mode, "train.steps": 30}), str(tmp_path)
    )
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.75 * first, (first, last)  # 5.5 -> about 3 on this corpus: it learns


def test_the_planner_scales_attention_flops_by_the_density() -> None:
    from loom.attention_walk import layout_density
    from loom.plan.flops import GPTShape, model_flops

    sparse = SparsityConfig(mode="sliding_window", num_sliding_window_blocks=3)
    rho = layout_density(sparse, 4, 4096)
    assert rho == pytest.approx((2 * 256 - 1) / 256**2)  # the causal window: two blocks a row
    dense, thin = GPTShape(12, 768, 50257, 4096), GPTShape(12, 768, 50257, 4096, rho)
    attention = model_flops(dense, 1) - model_flops(GPTShape(12, 768, 50257, 4096, 0.0), 1)
    assert model_flops(dense, 1) - model_flops(thin, 1) == pytest.approx((1 - rho) * attention)


def _flex_tiles(config: SparsityConfig, heads: int, seq: int) -> float:
    """FlexAttention's computed share of the S x S scores, counted on the element mask: its tiles
    (the block where 128 divides it, else 128 tokens) that hold an attended score, each as far as
    the sequence goes."""
    distinct = min(heads, 4) if config.different_layout_per_head else 1
    mask = dense_mask(make_layout(config, heads, seq)[:distinct], config.block, causal=True)
    tile = config.block if config.block % 128 == 0 else 128
    t = -(-seq // tile)
    padded = torch.zeros(distinct, t * tile, t * tile, dtype=torch.bool)
    padded[:, :seq, :seq] = mask
    hit = padded.view(distinct, t, tile, t, tile).any(4).any(2).double()
    side = (torch.arange(t * tile) < seq).view(t, tile).sum(-1).double()
    return float((hit * side.view(1, -1, 1) * side.view(1, 1, -1)).sum()) / (distinct * seq * seq)


def test_the_step_time_counts_the_blocks_the_kernel_computes(monkeypatch) -> None:  # noqa: ANN001
    """The planner's model FLOPs count the kept blocks; its step time what the kernel computes:
    on CPU the C++ kernel the kept blocks, the torch-ops one each row's band and gathered slots up
    to its last kept one (a run's longest row's), on CUDA FlexAttention's 128-token tiles that
    hold a kept block."""
    from loom.attention_walk import computed_density, layout_density

    fixed = SparsityConfig(block=64, mode="fixed", num_local_blocks=4, num_global_blocks=1, kernel="torch")
    assert computed_density(fixed, 8, 8192) == pytest.approx(
        19968 / 18432 * layout_density(fixed, 8, 8192)
    )  # window by window: 4 rows x (4 + w) slots in window w, as many as runs of 4 rows
    window = SparsityConfig(block=64, mode="sliding_window", num_sliding_window_blocks=3, kernel="torch")
    assert computed_density(window, 8, 8192) == pytest.approx(2 * 128 / 128**2)  # the band, both slots on every row
    for kernel in ("cpp", "auto"):  # the C++ kernel: the kept blocks (the window's first row has one)
        cpp = dataclasses.replace(window, kernel=kernel)
        assert computed_density(cpp, 8, 8192) == pytest.approx((2 * 128 - 1) / 128**2)
        assert computed_density(dataclasses.replace(fixed, kernel=kernel), 8, 8192) == layout_density(fixed, 8, 8192)
    # 8 blocks of 64 in tiles of 128: the diagonal tiles and the ones below them, 4 blocks each
    assert computed_density(window, 8, 512, "cuda") == pytest.approx((4 + 3) * 4 / 64)
    assert layout_density(window, 8, 512) == pytest.approx((8 + 7) / 64)
    for params, seq in [  # tiles of 128 that blocks of 48 straddle, blocks of 192 as tiles, a partial last tile
        ({"mode": "sliding_window", "block": 48, "num_sliding_window_blocks": 3}, 48 * 64),
        ({"mode": "fixed", "block": 192, "num_local_blocks": 4}, 192 * 32),
        ({"mode": "bigbird", "block": 32, "num_random_blocks": 2, "different_layout_per_head": True}, 32 * 40),
        ({"mode": "dense", "block": 16}, 48),
    ]:
        config = SparsityConfig(**params)
        assert computed_density(config, 4, seq, "cuda") == pytest.approx(_flex_tiles(config, 4, seq)), params

    from loom.config import load_config
    from loom.plan import layout as plan_layout
    from loom.plan.flops import GPTShape, model_flops
    from loom.plan.hardware import load_hardware
    from loom.plan.report import predict_run

    items = ['model.attention="sparse"', 'model.sparse_attention.mode="fixed"', "model.sparse_attention.block=64"]
    items += [
        'model.sparse_attention.kernel="torch"',  # its computed share differs from the kept one
        "model.n_layers=2",
        "model.d_model=256",
        "model.n_heads=4",
        "model.max_seq_len=8192",
        "train.seq_len=8192",
    ]
    config = load_config(None, [*items, "train.micro_batch=1", "train.global_batch=1", "model.vocab_size=257"])
    cpu = load_hardware("cpu")  # no fixed cost per block: the compute is the FLOPs over one rate
    predicted = predict_run(config, 1, cpu, "cpu").compute_s
    monkeypatch.setattr(plan_layout, "computed_density", lambda c, h, s_, d: layout_density(c, h, s_))
    counted_kept = predict_run(config, 1, cpu, "cpu").compute_s
    kept, ran = (GPTShape(2, 256, 257, 8192, rho(fixed, 4, 8192)) for rho in (layout_density, computed_density))
    assert predicted / counted_kept == pytest.approx(model_flops(ran, 1) / model_flops(kept, 1))
    assert predicted / counted_kept > 1.03  # 8% more of the attention core, about 40% of the FLOPs at 8k tokens


def test_attention_layout_command_prints_the_density_and_draws(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from loom.cli import main

    out = tmp_path / "layout.png"
    argv = ["attention-layout", "--kind", "bigbird", "--seq-len", "512", "--param", "num_random_blocks=2"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "of dense causal" in printed and out.stat().st_size > 1000
    assert main(["attention-layout", "--kind", "fixed", "--seq-len", "500"]) == 2
    err = capsys.readouterr().err  # in this command's flags, not the config's keys
    assert "--block = 16 does not divide" in err and "change --seq-len" in err and "model.sparse" not in err
    assert main(["attention-layout", "--kind", "bigbird", "--param", "num_random_blocks=-1"]) == 2
    assert "--param num_random_blocks = -1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- top-k


def _topk_reference(q, k, v, top_k):  # noqa: ANN001, ANN202
    s = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    kth = scores.topk(min(top_k, s), dim=-1).values[..., -1:]
    return torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("top_k", [1, 5, 64])
def test_topk_attention_is_exact_against_dense_top_k(top_k: int) -> None:
    from loom.model.topk_attention import topk_attention

    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = topk_attention(q, k, v, top_k, chunk=16)  # several chunks, the last one short
    want = _topk_reference(q, k, v, top_k)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(got)
    for a, b, name in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad), "qkv"):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_topk_with_every_key_is_dense_causal_attention() -> None:
    from loom.model.topk_attention import topk_attention

    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    torch.testing.assert_close(
        topk_attention(q, k, v, 32), F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------- LSH


def test_lsh_with_one_bucket_and_one_round_is_dense_causal_attention() -> None:
    from loom.model.lsh_attention import draw_rotations, lsh_attention

    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 32, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    one = draw_rotations(3, 8, n_hashes=1, n_buckets=1).double()
    for chunk in (32, 16):  # one chunk, and two that each look back at the other
        got = lsh_attention(q, k, v, one, chunk)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad(got.sum(), (q, k, v))
        for a, b in zip(grads, torch.autograd.grad(want.sum(), (q, k, v))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lsh_attends_within_buckets_causally_and_to_itself_only_when_alone() -> None:
    from loom.model.lsh_attention import hash_buckets, lsh_attention

    torch.manual_seed(4)
    b, h, s, d = 1, 2, 64, 16
    q, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    rotations = torch.randn(h, d, 1, 4)  # 8 buckets, one round
    # a value change at a later position never reaches an earlier output (causal)
    out = lsh_attention(q, None, v, rotations, chunk=8)
    later = v.clone()
    later[:, :, 40:] += 1.0
    assert torch.equal(lsh_attention(q, None, later, rotations, chunk=8)[:, :, :40], out[:, :, :40])
    # the first position sees only itself: its output is its own value
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    # a token whose bucket holds only itself and whose chunks hold nothing earlier: still itself,
    # never nothing (no NaN anywhere)
    assert torch.isfinite(out).all()
    assert hash_buckets(q, rotations[:, :, 0]).max() < 8


def test_lsh_rounds_combine_toward_full_attention() -> None:
    from loom.model.lsh_attention import draw_rotations, lsh_attention

    torch.manual_seed(5)
    q, v = torch.randn(1, 1, 128, 8, requires_grad=True), torch.randn(1, 1, 128, 8, requires_grad=True)
    rotations = draw_rotations(1, 8, n_hashes=4, n_buckets=8)
    out = lsh_attention(q, None, v, rotations, chunk=16)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()
    # more rounds see more keys: closer to full (non-self) attention than one round
    exact = (
        torch.softmax(
            (q @ F.normalize(q, dim=-1).transpose(-1, -2) / math.sqrt(8)).masked_fill(
                torch.ones(128, 128, dtype=torch.bool).triu(0), float("-inf")
            )[:, :, 1:],
            dim=-1,
        )
        @ v
    )
    one = lsh_attention(q, None, v, rotations[:, :, :1], chunk=16)
    assert (out[:, :, 1:] - exact).abs().mean() < (one[:, :, 1:] - exact).abs().mean()


def _union_of_windows(q: torch.Tensor, k: torch.Tensor, rotations: torch.Tensor, chunk: int) -> torch.Tensor:
    """(S, S) True where key j is in query i's window (its chunk or the one before) in some round."""
    from loom.model.lsh_attention import hash_buckets

    s = q.shape[2]
    n, pos = s // chunk, torch.arange(s)
    seen = torch.zeros(s, s, dtype=torch.bool)
    for r in range(rotations.shape[2]):
        cq = (hash_buckets(q, rotations[:, :, r])[0, 0] * s + pos).argsort().argsort() // chunk
        ck = (hash_buckets(k, rotations[:, :, r])[0, 0] * s + pos).argsort().argsort() // chunk
        seen |= (ck[None, :] == cq[:, None]) | (ck[None, :] == (cq[:, None] - 1) % n)
    return seen


def test_lsh_rounds_with_duplicate_correction_are_exact_attention_over_the_union_of_windows() -> None:
    from loom.model.lsh_attention import draw_rotations, lsh_attention

    torch.manual_seed(7)
    s, d, chunk = 64, 8, 8
    q, k, v = (torch.randn(1, 1, s, d, dtype=torch.float64) for _ in range(3))
    rotations = draw_rotations(1, d, n_hashes=3, n_buckets=4).double()
    got = lsh_attention(q, k, v, rotations, chunk)
    # the reference: softmax over every key some round's window holds (causal), plus the token itself
    visible = (_union_of_windows(q, k, rotations, chunk) & torch.ones(s, s, dtype=torch.bool).tril(-1)) | torch.eye(
        s, dtype=torch.bool
    )
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(got, torch.softmax(scores, dim=-1) @ v, rtol=1e-10, atol=1e-10)
    assert visible.sum() < 0.6 * torch.ones(s, s).tril().sum()  # the rounds did not see everything


# ----------------------------------------------------------------------------- reversible blocks


def _rev_model(layers: int, **extra) -> Transformer:
    items = [f"model.n_layers={layers}", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64"]
    items += ["model.reversible=true", *(f"model.{k}={v}" for k, v in extra.items())]
    return Transformer(load_config(None, items).model, seed=1)


def _naive_reversible_loss(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """The same two-stream architecture through ordinary autograd (everything kept)."""
    h = model.emb_dropout(model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1])))
    y1, y2 = h, h
    positions = torch.arange(x.shape[1])
    for i in model.layers:
        block = model.blocks[str(i)]
        y1 = y1 + block.attention_branch(y2, model.rope, positions, None)
        y2 = y2 + block.mlp_branch(y1, None)
    logits = model.final_norm((y1 + y2) / 2) @ model.tok_emb.weight.t()
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), x.view(-1))  # fp32, as the model


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no dropout", "dropout: masks replayed"])
def test_reversible_gradients_equal_ordinary_backward_of_the_same_blocks(dropout: float) -> None:
    torch.set_default_dtype(torch.float64)
    try:
        model = _rev_model(3, dropout=dropout)
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(7)
        loss = model.loss(x, x)
        loss.backward()
        mine = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        torch.manual_seed(7)  # the same draws in the same order: F1, G1, F2, ...
        want = _naive_reversible_loss(model, x)
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-7, atol=1e-7)
        for name, p in model.named_parameters():  # float64 blocks, the loss in fp32 as the model's
            torch.testing.assert_close(mine[name], p.grad, rtol=1e-6, atol=1e-9, msg=name)
    finally:
        torch.set_default_dtype(torch.float32)


def test_reversible_activations_do_not_grow_with_depth() -> None:
    from loom.parallel.memory import ActivationMeter

    saved = {}
    for layers in (2, 8):
        for rev in (False, True):
            items = [f"model.n_layers={layers}", "model.d_model=64", "model.n_heads=4", "model.vocab_size=64"]
            model = Transformer(load_config(None, [*items, f"model.reversible={str(rev).lower()}"]).model)
            x = torch.randint(0, 64, (2, 64))
            meter = ActivationMeter()
            with meter.forward(0):
                loss = model.loss(x, x)
            loss.backward()
            saved[(layers, rev)] = meter.take_step()["mem_activation_bytes"]
    assert saved[(8, False)] > 3 * saved[(2, False)]  # ordinary blocks: linear in depth
    assert saved[(8, True)] == saved[(2, True)]  # reversible: the last outputs, whatever the depth
    assert saved[(8, True)] < saved[(8, False)] / 4


def test_reversible_trains_with_dropout_and_tp2_matches_the_single_process(tmp_path: Path, text_corpus: Path) -> None:
    # dropout on: the recomputed branches must replay the first pass's masks, or the gradients
    # would be wrong and the loss would not fall
    extra = {"model.reversible": True, "model.dropout": 0.1, "model.attention": "dense", "train.steps": 20}
    noisy = train_rank(_sparse_items(text_corpus, **extra), str(tmp_path / "dropout"))
    assert noisy[-1]["loss"] < 0.8 * noisy[0]["loss"]
    exact = {"model.reversible": True, "model.attention": "dense"}
    one = train_rank(_sparse_items(text_corpus, **exact), str(tmp_path / "one"))
    items = _sparse_items(text_corpus, **exact, **{"parallel.tp": 2, "parallel.sequence_parallel": True})
    two = run_ranks(train_rank, 2, args=(items, str(tmp_path / "tp2")), timeout_s=200)[0]
    for a, b in zip(two, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["parallel.pp=2"], "one stream, not two"),
        (["zero.stage=3"], "ZeRO-3"),
        (['train.recompute="full"'], "already recompute"),
    ],
)
def test_reversible_refuses_what_it_cannot_compose_with(items: list[str], match: str) -> None:
    with pytest.raises(LoomError, match=match) as err:
        load_config(None, ["model.reversible=true", *items])
    assert "model.reversible = false" in err.value.fix


def test_the_planner_predicts_the_reversible_stack_activations() -> None:
    from loom.parallel.memory import ActivationMeter
    from loom.plan.rank_memory import predict_rank_memory

    for rev in ("false", "true"):
        items = ["model.n_layers=4", "model.d_model=64", "model.n_heads=4", "model.vocab_size=64"]
        items += ["train.seq_len=64", "train.micro_batch=2", "train.global_batch=2", f"model.reversible={rev}"]
        config = load_config(None, items)
        model = Transformer(config.model)
        x = torch.randint(0, 64, (2, 64))
        meter = ActivationMeter()
        with meter.forward(0):
            loss = model.loss(x, x)
        loss.backward()
        measured = meter.take_step()["mem_activation_bytes"]
        assert measured == pytest.approx(predict_rank_memory(config, 1).activations, rel=0.01), rev


def test_flex_attention_with_the_layouts_block_mask_equals_the_kernel() -> None:
    """The CUDA path (FlexAttention, compiled there) from the same layout: its forward checked here,
    where torch 2.13 runs FlexAttention without compiling and without a backward."""
    import warnings

    from loom.model.block_sparse import flex_block_mask, flex_sparse_attention

    torch.manual_seed(6)
    block, n, heads = 16, 16, 2
    config = SparsityConfig(mode="bigbird", block=block, different_layout_per_head=True, num_random_blocks=2)
    layout = make_layout(config, heads, block * n)
    q, k, v = (torch.randn(1, heads, block * n, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = flex_sparse_attention(q, k, v, flex_block_mask(layout, block, block * n, "cpu"), compiled=False)
    torch.testing.assert_close(got, block_sparse_attention(q, k, v, Slots.of(layout, block)), rtol=1e-5, atol=1e-5)


def test_sparse_attention_composes_with_pp_zero_and_recompute(tmp_path: Path, text_corpus: Path) -> None:
    kind = {"model.sparse_attention.mode": "bigbird", "model.sparse_attention.different_layout_per_head": True}
    kind |= {"model.n_layers": 4, "train.global_batch": 8, "train.micro_batch": 2}
    one = train_rank(_sparse_items(text_corpus, **kind), str(tmp_path / "one"))
    layout = {"parallel.pp": 2, "zero.stage": 1, "train.recompute": "selective", "train.ckpt_every": 2}
    got = run_ranks(
        train_rank, 4, args=(_sparse_items(text_corpus, **kind, **layout), str(tmp_path / "4")), timeout_s=300
    )
    for a, b in zip(got[0], one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
