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

from loom.model.dropout import keep_mask, quantized_p


def _causal(s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """-inf above the diagonal (the keys a query must not see), 0 elsewhere: added to the scores."""
    return torch.full((s, s), float("-inf"), dtype=dtype, device=device).triu_(1)


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        b, heads, s, d = q.shape
        kv = k.shape[1]
        group = heads // kv
        work = torch.promote_types(q.dtype, torch.float32)
        scale = d**-0.5
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores and probabilities under autocast too
            qs = (q.to(work) * scale).reshape(b, kv, group * s, d)
            scores = qs @ k.to(work).transpose(-1, -2)  # (b, kv, group x s, s)
            scores.view(b, kv, group, s, s).add_(_causal(s, work, q.device))
            probs = scores.softmax(-1)
            del scores
            keep = keep_mask(probs.shape, p, q.device)
            kept = 1.0 / (1.0 - quantized_p(p))
            out = (probs * keep) @ v.to(work)
            out.mul_(kept)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.kept, ctx.scale = kept, scale
        return out.view(b, heads, s, d).to(q.dtype)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def backward(ctx, grad: torch.Tensor):
        q, k, v, probs, keep = ctx.saved_tensors
        b, heads, s, d = q.shape
        kv = k.shape[1]
        work = probs.dtype
        grad = (grad.to(work) * ctx.kept).reshape(b, kv, -1, d)
        dropped = probs * keep
        grad_v = dropped.transpose(-1, -2) @ grad
        del dropped
        grad_dropped = grad @ v.to(work).transpose(-1, -2)
        grad_probs = grad_dropped.mul_(keep)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, work)
        del grad_probs, grad_dropped
        grad_scores.mul_(ctx.scale)
        grad_q = (grad_scores @ k.to(work)).view(b, heads, s, d)
        grad_k = grad_scores.transpose(-1, -2) @ q.to(work).reshape(b, kv, -1, d)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal) dropped out with probability ``p`` (module docstring),
    times v. q: (batch, heads, seq, d); k, v: (batch, kv_heads, seq, d), heads % kv_heads == 0."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout_attention needs 0 < p < 1, got {p}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of K/V heads ({k.shape[1]})")
    return _DropoutAttention.apply(q, k, v, p)
