"""Top-k attention (Explicit Sparse Transformer, Zhao et al. 2019): each query keeps its k
largest scores, the rest are dropped before the softmax.

``topk_attention(q, k, v, top_k)``: q, k, v ``(batch, heads, S, d)``, causal. Queries are taken
``chunk`` rows at a time: a chunk's scores against every key (``chunk x S``, never ``S x S``),
the future masked, the k largest kept (fewer where a row has fewer keys: the masked picks
weigh 0), their softmax ``P`` and the weighted sum of the picked values. Backward keeps only
the picks (indices and ``P``, ``S x k`` each) and q, k, v:

    dV[idx] += P dO,  dP = dO . V[idx],  dS = P (dP - sum(P dP)),
    dQ = scale sum(dS K[idx]),  dK[idx] += scale dS Q.

The cost is the dense score computation (to find the top k) plus ``S x k`` for the rest: top-k
saves memory (linear in S beyond one chunk) and the softmax's work, not the scores'.
"""

from __future__ import annotations

import math

import torch

CHUNK = 512  # query rows per score tile


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, S, d) rows at ``index`` (B, H, C, k): (B, H, C, k, d)."""
    b, h, s, d = x.shape
    c, k = index.shape[-2:]
    flat = (index + (torch.arange(b * h, device=x.device) * s).view(b, h, 1, 1)).reshape(-1)
    return x.reshape(b * h * s, d).index_select(0, flat).view(b, h, c, k, d)


def _scatter_rows(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``target`` (B, H, S, d) rows at ``index`` (B, H, C, k) += ``values`` (B, H, C, k, d)."""
    b, h, s, d = target.shape
    flat = (index + (torch.arange(b * h, device=target.device) * s).view(b, h, 1, 1)).reshape(-1)
    target.view(b * h * s, d).index_add_(0, flat, values.reshape(-1, d))


class _TopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, top_k: int, scale: float, chunk: int):  # noqa: ANN001, ANN205
        b, h, s, d = q.shape
        keep = min(top_k, s)
        picks = torch.empty(b, h, s, keep, dtype=torch.long, device=q.device)
        probs = torch.empty(b, h, s, keep, dtype=q.dtype, device=q.device)
        out = torch.empty_like(q)
        columns = torch.arange(s, device=q.device)
        for start in range(0, s, chunk):
            rows = slice(start, min(start + chunk, s))
            scores = (q[:, :, rows] @ k.transpose(-1, -2)) * scale
            future = columns.view(1, s) > columns[rows].view(-1, 1)
            scores.masked_fill_(future, float("-inf"))
            top, index = scores.topk(keep, dim=-1)
            p = torch.softmax(top, dim=-1)  # a masked pick is -inf: weight 0
            picks[:, :, rows], probs[:, :, rows] = index, p
            out[:, :, rows] = (p.unsqueeze(-1) * _rows(v, index)).sum(-2)
        ctx.save_for_backward(q, k, v, picks, probs)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, picks, probs = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        s = q.shape[2]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for start in range(0, s, chunk):
            rows = slice(start, min(start + chunk, s))
            index, p, do = picks[:, :, rows], probs[:, :, rows], grad_out[:, :, rows]
            _scatter_rows(dv, index, p.unsqueeze(-1) * do.unsqueeze(-2))
            dp = (do.unsqueeze(-2) * _rows(v, index)).sum(-1)
            ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
            dq[:, :, rows] = (ds.unsqueeze(-1) * _rows(k, index)).sum(-2)
            _scatter_rows(dk, index, ds.unsqueeze(-1) * q[:, :, rows].unsqueeze(-2))
        return dq, dk, dv, None, None, None


def topk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int, scale: float | None = None, chunk: int = CHUNK
) -> torch.Tensor:
    """Causal attention over each query's ``top_k`` largest scores: (batch, heads, S, d)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _TopK.apply(q.contiguous(), k.contiguous(), v.contiguous(), top_k, scale, chunk)
