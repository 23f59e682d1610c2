"""Causal self-attention with grouped-query heads, through scaled_dot_product_attention.

Under tensor parallelism each rank computes n_heads / t query heads. K/V heads are split
the same way when t divides n_kv_heads; when t is larger (t % n_kv_heads == 0) each rank
holds the one K/V head its query heads use, replicated on t / n_kv_heads ranks (their
placement says so: the replicas' gradients are partial, summed after backward by
:func:`loom.parallel.grads.sum_partial_grads`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.model.layers import RotaryEmbedding
from loom.model.recompute import recompute
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
        kv = {"rows": kv_rows, "replicas": self.kv_replicas}
        self.k_proj = ColumnParallelLinear(cfg.d_model, kv_dim, tp, bias=cfg.use_bias, **kv)
        self.v_proj = ColumnParallelLinear(cfg.d_model, kv_dim, tp, bias=cfg.use_bias, **kv)
        self.o_proj = RowParallelLinear(cfg.d_model, cfg.d_model, tp, bias=cfg.use_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None,
        positions: torch.Tensor,
        rng: ParallelRNG | None = None,
        recompute_core: bool = False,
    ) -> torch.Tensor:
        """``recompute_core``: the core attention (QK^T, softmax, dropout, over V) keeps only
        q, k and v for backward and runs again there (selective recomputation)."""
        q, k, v = self.tp.enter_columns(x, self.q_proj, self.k_proj, self.v_proj)
        batch, seq, _ = q.shape
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q, positions), rope(k, positions)
        out = recompute(self._core, q, k, v, rng, rng=rng) if recompute_core else self._core(q, k, v, rng)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rng: ParallelRNG | None) -> torch.Tensor:
        """softmax(QK^T / sqrt(d) + causal mask), dropped out, times V: (batch, heads, seq, head_dim)."""
        dropout = self.dropout if self.training else 0.0
        # this rank's heads are its own: their dropout draws from the tp stream
        stream = rng.tp_stream() if dropout and rng is not None else contextlib.nullcontext()
        with stream:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
            )
