"""loom's dropout (a uint8 mask from 15 random bits an element) and its attention core with
dropout: the mask's statistics, gradients against a dense reference under the same mask, what
they keep for backward, and the replay that recomputation relies on."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

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
    # neighbours are independent: the four lanes of one int64 draw do not agree more than chance
    keep = keep_mask((n // 4, 4), 0.5, "cpu").double()
    agree = (keep[:, 0] == keep[:, 3]).double().mean().item()
    assert abs(agree - 0.5) < 5 * (0.25 / (n // 4)) ** 0.5
    # the low lanes and the top lane (whose int64 sign bit is always 0) drop alike
    rates = 1.0 - keep_mask((n // 4, 4), 0.1, "cpu").double().mean(0)
    assert (rates - quantized_p(0.1)).abs().max().item() < 5 * (0.09 / (n // 4)) ** 0.5


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


def test_tiles_cover_the_scores_in_order_with_contiguous_pieces() -> None:
    for slabs, rows, cols, budget in [(6, 8, 8, 150), (3, 40, 16, 100), (2, 10, 7, 64), (5, 4, 4, 1000)]:
        pieces = tiles(slabs, rows, cols, budget)
        flat = torch.arange(slabs * rows * cols).view(slabs, rows, cols)
        covered = torch.cat([flat[i:j, r:t].reshape(-1) for i, j, r, t in pieces])
        assert torch.equal(covered, flat.reshape(-1))  # everything once, in memory order
        for i, j, r, t in pieces:
            assert flat[i:j, r:t].is_contiguous()
            assert (j - i) * (t - r) * cols <= max(budget, 4 * cols)
            assert (j - i == 1 and t == rows) or ((t - r) * cols) % 4 == 0  # the mask drawn piece by piece


@pytest.mark.parametrize(
    "tile", [1 << 18, 1200, 384, 40], ids=["one tile", "whole slabs", "rows across heads", "rows of a slab"]
)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_dropout_attention_equals_dense_attention_under_the_same_mask(
    heads: int, kv_heads: int, tile: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "TILE_ELEMENTS", tile)
    torch.manual_seed(2)
    b, s, d, p = 2, 24, 8, 0.3
    q = torch.randn(b, heads, s, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, s, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    state = torch.get_rng_state()
    out = dropout_attention(q, k, v, p)
    torch.set_rng_state(state)  # the core draws one mask over (b, kv, group x s, s): query heads in order
    keep = keep_mask((b, kv_heads, heads // kv_heads * s, s), p, "cpu").view(b, heads, s, s).double()
    ref = _reference(q, k, v, keep, p)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    weight = torch.randn_like(ref)
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert keep.mean().item() < 1.0  # something was dropped


def test_dropout_attention_keeps_fp32_probabilities_and_a_byte_mask_under_autocast() -> None:
    torch.manual_seed(3)
    b, heads, s, d = 2, 4, 32, 16
    q, k, v = (torch.randn(b, heads, s, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved = []
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        out = dropout_attention(q, k, v, 0.1)
    assert out.dtype == torch.bfloat16
    scores = sorted(str(t.dtype) for t in saved if t.numel() == b * heads * s * s)
    assert scores == ["torch.float32", "torch.uint8"]  # P and keep: not the scores, a mask and the dropped scores
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


def test_dropout_attention_rejects_what_it_cannot_run() -> None:
    q = torch.randn(1, 3, 8, 4)
    with pytest.raises(ValueError, match="0 < p < 1"):
        dropout_attention(q, q, q, 0.0)
    with pytest.raises(ValueError, match="multiple of K/V heads"):
        dropout_attention(q, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 0.1)
