"""Causal self-attention with grouped-query heads, through scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.model.layers import RotaryEmbedding


class Attention(nn.Module):
    """Q, K, V as separate projections so tensor parallelism can split each by heads.

    With grouped-query attention (llama, n_kv_heads < n_heads) each K/V head serves
    n_heads / n_kv_heads query heads.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.use_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.use_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.use_bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding | None, positions: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q, positions), rope(k, positions)
        out = F.scaled_dot_product_attention(
            q, k, v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
