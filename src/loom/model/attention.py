"""Causal self-attention with grouped-query heads, through scaled_dot_product_attention.

Under tensor parallelism each rank computes n_heads / t query heads. K/V heads are split
the same way when t divides n_kv_heads; when t is larger (t % n_kv_heads == 0) each rank
holds the one K/V head its query heads use, replicated on t / n_kv_heads ranks, and the
gradients of those replicas are summed after backward (``sync_replicated_kv_grads``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.model.layers import RotaryEmbedding
from loom.parallel.random import ParallelRNG
from loom.parallel.tensor import ColumnParallelLinear, RowParallelLinear, TensorParallel, shard_range


class Attention(nn.Module):
    """Q, K, V as separate column-parallel projections, output row-parallel."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        kv_dim = cfg.kv_heads * cfg.head_dim
        if cfg.kv_heads % tp.size == 0:
            self.kv_replicas = 1
            kv_rows = shard_range(kv_dim, tp.size, tp.rank)
        else:  # tp > n_kv_heads: one head per rank, replicated
            self.kv_replicas = tp.size // cfg.kv_heads
            head = tp.rank // self.kv_replicas
            kv_rows = slice(head * cfg.head_dim, (head + 1) * cfg.head_dim)
        self.q_proj = ColumnParallelLinear(cfg.d_model, cfg.d_model, tp, bias=cfg.use_bias)
        self.k_proj = ColumnParallelLinear(cfg.d_model, kv_dim, tp, bias=cfg.use_bias, rows=kv_rows)
        self.v_proj = ColumnParallelLinear(cfg.d_model, kv_dim, tp, bias=cfg.use_bias, rows=kv_rows)
        self.o_proj = RowParallelLinear(cfg.d_model, cfg.d_model, tp, bias=cfg.use_bias)
        if self.kv_replicas > 1:
            for p in (*self.k_proj.parameters(), *self.v_proj.parameters()):
                p.tp_replicas = self.kv_replicas
                p.tp_owner = tp.rank % self.kv_replicas == 0  # counted once in the grad norm

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding | None, positions: torch.Tensor, rng: ParallelRNG | None = None
    ) -> torch.Tensor:
        q, k, v = self.tp.enter_columns(x, self.q_proj, self.k_proj, self.v_proj)
        batch, seq, _ = q.shape
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q, positions), rope(k, positions)
        dropout = self.dropout if self.training else 0.0
        # this rank's heads are its own: their dropout draws from the tp stream
        stream = rng.tp_stream() if dropout and rng is not None else contextlib.nullcontext()
        with stream:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def sync_replicated_kv_grads(model: nn.Module, tp: TensorParallel) -> None:
    """Sum the gradients of replicated K/V heads over the ranks holding the same head.

    One all-reduce over the whole tp group of a buffer laid out like the full K/V
    weights: each rank adds its gradient at its head's rows, so every head's rows end up
    holding the sum over that head's replicas (cost: the full K/V size, not 1/t of it).
    """
    layers = [m for m in model.modules() if isinstance(m, Attention) and m.kv_replicas > 1]
    if not layers:
        return
    pieces = []
    for layer in layers:
        for proj in (layer.k_proj, layer.v_proj):
            for name, p in proj.named_parameters():
                full_rows = proj.shards[name][0][0]
                pieces.append((p, proj.rows, full_rows))
    total = sum(full * (p.numel() // p.shape[0]) for p, _, full in pieces)
    flat = torch.zeros(total, dtype=pieces[0][0].dtype, device=pieces[0][0].device)
    offset = 0
    views = []
    for p, rows, full in pieces:
        width = p.numel() // p.shape[0]
        region = flat[offset : offset + full * width].view(full, width)[rows]
        if p.grad is not None:
            region.copy_(p.grad.reshape(p.shape[0], width))
        views.append((p, region))
        offset += full * width
    tp.comm.all_reduce(flat, op="sum", tag="tp-kv-grads")
    for p, region in views:
        if p.grad is not None:
            p.grad.copy_(region.reshape(p.grad.shape))
