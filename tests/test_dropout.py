"""loom's dropout (a uint8 mask from 16 random bits an element) and its attention core with
dropout: the mask's statistics, gradients against a dense reference under the same mask, what
they keep for backward, and the replay that recomputation relies on."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from loom.attention_walk import causal_run_length, causal_run_scores, causal_runs
from loom.model import dropout_attention as core
from loom.model.dropout import Dropout, dropout, keep_mask, quantized_p
from loom.model.dropout_attention import dropout_attention, tiles


def test_the_mask_drops_the_quantized_probability() -> None:
    torch.manual_seed(0)
    n = 1 << 22
    for p in (0.1, 0.5, 0.03):
        keep = keep_mask((n,), p, "cpu")
        assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) <= {0, 1}
        dropped = 1.0 - keep.double().mean().item()
        assert abs(dropped - quantized_p(p)) < 5 * (p * (1 - p) / n) ** 0.5  # 5 sigma of a binomial
        assert abs(quantized_p(p) - p) <= 2**-16
    # neighbours are independent: the four 16-bit lanes of one 64-bit draw do not agree more than chance
    keep = keep_mask((n // 4, 4), 0.5, "cpu").double()
    agree = (keep[:, 0] == keep[:, 3]).double().mean().item()
    assert abs(agree - 0.5) < 5 * (0.25 / (n // 4)) ** 0.5
    # every lane of a 64-bit draw drops alike
    rates = 1.0 - keep_mask((n // 4, 4), 0.1, "cpu").double().mean(0)
    assert (rates - quantized_p(0.1)).abs().max().item() < 5 * (0.09 / (n // 4)) ** 0.5


def test_the_mask_is_a_function_of_the_generator_state_alone() -> None:
    """Equal generator states draw equal masks whatever the thread count; the chunks' generators
    differ (no chunk repeats another), and the draw moves the default generator on."""
    from loom.model import dropout as module

    n = 2 * module.CHUNK + 12345  # three chunks, the last short
    threads = torch.get_num_threads()
    masks = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            torch.manual_seed(7)
            masks.append(keep_mask((n,), 0.3, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(m, masks[0]) for m in masks[1:])
    first, second = masks[0][: module.CHUNK], masks[0][module.CHUNK : 2 * module.CHUNK]
    assert (first == second).double().mean().item() < 0.7  # independent chunks agree 0.58 of the time
    torch.manual_seed(7)
    keep_mask((n,), 0.3, "cpu")
    assert not torch.equal(keep_mask((n,), 0.3, "cpu"), masks[0])  # the seed was drawn: the next mask differs


def test_dropout_scales_what_it_keeps_and_its_gradient_is_the_mask() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 256, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    y = dropout(x, 0.2)
    torch.set_rng_state(state)
    keep = keep_mask(tuple(x.shape), 0.2, "cpu").double()
    scale = 1 / (1 - quantized_p(0.2))
    torch.testing.assert_close(y, x * keep * scale, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, keep * scale, rtol=0, atol=0)
    assert dropout(x, 0.2, training=False) is x and dropout(x, 0.0) is x
    module = Dropout(0.2).eval()
    assert module(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.0)


def _reference(q, k, v, keep, p):
    """Dense causal attention, K/V heads repeated for their query groups, the same mask applied."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) * keep / (1 - quantized_p(p))) @ v


def test_causal_runs_cover_the_triangle_once() -> None:
    for s, run in [(24, None), (24, 8), (23, 5), (100, None), (1000, None), (4096, None)]:
        runs = causal_runs(s, run)
        want = run or causal_run_length(s)
        assert [r for r, _ in runs] == list(range(0, s, want)) and runs[-1][1] == s
        assert all(e - r == want for r, e in runs[:-1])
        # every query row r sees keys [0, e) of its run, e > its position: the triangle, once
        assert causal_run_scores(s, run) == sum((e - r) * e for r, e in runs)
        assert s * (s + 1) // 2 <= causal_run_scores(s, run) <= s * (s + want) // 2
    assert causal_run_length(16) == 16 and causal_run_length(256) == 64 and causal_run_length(1024) == 128
    assert causal_run_length(8192) == 128


@pytest.mark.parametrize(
    ("slabs", "group", "s", "run", "budget"), [(6, 1, 8, 4, 150), (3, 2, 20, 8, 100), (2, 3, 10, 3, 64)]
)
def test_tiles_pack_each_run_of_each_slab_once(slabs, group, s, run, budget, monkeypatch) -> None:
    monkeypatch.setattr(core, "RUN", run)
    pieces, total = tiles(slabs, group, s, budget)
    assert total == slabs * group * causal_run_scores(s, run)
    seen, offset = set(), 0
    for t in pieces:
        assert t.offset == offset  # packed back to back
        offset += (t.last - t.first) * group * (t.end - t.start) * t.end
        assert t.last - t.first == 1 or (t.last - t.first) * group * (t.end - t.start) * t.end <= budget
        seen |= {(i, t.start) for i in range(t.first, t.last)}
    assert offset == total and seen == {(i, r) for r, _ in causal_runs(s, run) for i in range(slabs)}


def _unpacked_keep(saved: list[torch.Tensor], b: int, heads: int, kv_heads: int, s: int) -> torch.Tensor:
    """The core's saved uint8 mask as (b, heads, s, s), zero past each run's keys."""
    (packed,) = [t for t in saved if t.dtype == torch.uint8]
    group = heads // kv_heads
    dense = torch.zeros(b * kv_heads, group, s, s, dtype=torch.float64)
    pieces, total = tiles(b * kv_heads, group, s)
    assert packed.numel() == total
    for t in pieces:
        n = (t.last - t.first) * group * (t.end - t.start) * t.end
        part = packed[t.offset : t.offset + n].view(t.last - t.first, group, t.end - t.start, t.end)
        dense[t.first : t.last, :, t.start : t.end, : t.end] = part.double()
    return dense.view(b, heads, s, s)


@pytest.mark.parametrize(
    ("run", "tile"),
    [(None, 1 << 18), (8, 1 << 18), (8, 200), (5, 40)],
    ids=["one run", "runs", "runs, a slab a tile", "uneven runs"],
)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_dropout_attention_equals_dense_attention_under_the_same_mask(
    heads: int, kv_heads: int, run: int | None, tile: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "RUN", run)
    monkeypatch.setattr(core, "TILE_ELEMENTS", tile)
    torch.manual_seed(2)
    b, s, d, p = 2, 24, 8, 0.3
    q = torch.randn(b, heads, s, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, s, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = dropout_attention(q, k, v, p)
    keep = _unpacked_keep(saved, b, heads, kv_heads, s)
    ref = _reference(q, k, v, keep, p)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    weight = torch.randn_like(ref)
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    seen = keep.tril().sum() / (b * heads * s * (s + 1) / 2)
    assert 0.5 < seen < 0.9  # about 1 - p of the causal scores kept: the mask is real


def test_dropout_attention_keeps_fp32_probabilities_and_a_byte_mask_under_autocast() -> None:
    torch.manual_seed(3)
    b, heads, s, d = 2, 4, 128, 16
    q, k, v = (torch.randn(b, heads, s, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved = []
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        out = dropout_attention(q, k, v, 0.1)
    assert out.dtype == torch.bfloat16
    scores = sorted(str(t.dtype) for t in saved if t.numel() == b * heads * causal_run_scores(s))
    assert scores == ["torch.float32", "torch.uint8"]  # P and keep: not the scores, a mask and the dropped scores
    assert causal_run_scores(s) < s * s  # the causal triangle's runs, not the square
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def test_recomputation_replays_the_same_masks() -> None:
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    plain = dropout_attention(q, k, v, 0.5)
    grads = torch.autograd.grad(plain.square().sum(), (q, k, v))
    torch.manual_seed(5)
    again = checkpoint(dropout_attention, q, k, v, 0.5, use_reentrant=False)
    torch.manual_seed(6)  # the generator moves on before backward: the checkpoint restores its state
    regrads = torch.autograd.grad(again.square().sum(), (q, k, v))
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    for g, w in zip(regrads, grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
def test_selective_recomputation_keeps_q_k_v_only_and_changes_nothing(
    heads: int, kv_heads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``recompute=True``: the same output and gradients, bit for bit, the generator left where the
    keeping core leaves it, and nothing saved for backward but q, k and v (P and the mask come back
    from the seed in backward)."""
    monkeypatch.setattr(core, "RUN", 8)
    q = torch.randn(2, heads, 32, 8, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 32, 8, requires_grad=True) for _ in range(2))
    weight = torch.randn(2, heads, 32, 8)
    results = {}
    for recompute in (False, True):
        torch.manual_seed(7)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            out = dropout_attention(q, k, v, 0.3, recompute=recompute)
        after = torch.randint(1 << 30, ())  # where the generator stands
        torch.manual_seed(8)  # moves on before backward: the recomputed mask must not read it
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        results[recompute] = (out, after, grads, saved)
    (out, after, grads, saved), (re_out, re_after, re_grads, re_saved) = results[False], results[True]
    torch.testing.assert_close(re_out, out, rtol=0, atol=0)
    assert re_after == after
    for g, w in zip(re_grads, grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert len(saved) == 5 and len(re_saved) == 3
    assert all(a is b for a, b in zip(re_saved, (q, k, v), strict=True))


def test_dropout_attention_rejects_what_it_cannot_run() -> None:
    q = torch.randn(1, 3, 8, 4)
    with pytest.raises(ValueError, match="0 < p < 1"):
        dropout_attention(q, q, q, 0.0)
    with pytest.raises(ValueError, match="multiple of K/V heads"):
        dropout_attention(q, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 0.1)
