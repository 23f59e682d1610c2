"""Building blocks: normalisation, rotary embeddings, feed-forward networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.parallel.placement import declare_replicated
from loom.parallel.tensor import ColumnParallelLinear, RowParallelLinear, TensorParallel


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(cfg: ModelConfig, tp: TensorParallel) -> nn.Module:
    """LayerNorm (gpt2) or RMSNorm (llama), replicated; under SP it sees a sequence slice."""
    norm = (
        RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.family == "llama"
        else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.use_bias)
    )
    return declare_replicated(norm, tp.size, tp.rank, sequence_parallel=tp.sequence_parallel)


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" layout: feature i pairs with feature i + head_dim/2.

    Position p rotates pair k by angle p * theta^(-2k/head_dim).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, seq, head_dim); positions: (seq,)."""
        cos = self.cos[positions].to(x.dtype)
        sin = self.sin[positions].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class GeluMLP(nn.Module):
    """GPT-2 feed-forward: down(gelu_tanh(up(x))); up column-, down row-parallel.

    The activation stays local to each tp rank: one entry, one exit per MLP.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.up_proj = ColumnParallelLinear(cfg.d_model, cfg.ffn_dim, tp, bias=cfg.use_bias)
        self.down_proj = RowParallelLinear(cfg.ffn_dim, cfg.d_model, tp, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (up,) = self.tp.enter_columns(x, self.up_proj)
        return self.down_proj(F.gelu(up, approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """Llama feed-forward: down(silu(gate(x)) * up(x)); gate and up column-, down row-parallel."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.gate_proj = ColumnParallelLinear(cfg.d_model, cfg.ffn_dim, tp, bias=cfg.use_bias)
        self.up_proj = ColumnParallelLinear(cfg.d_model, cfg.ffn_dim, tp, bias=cfg.use_bias)
        self.down_proj = RowParallelLinear(cfg.ffn_dim, cfg.d_model, tp, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.tp.enter_columns(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


def make_mlp(cfg: ModelConfig, tp: TensorParallel) -> nn.Module:
    return SwiGLUMLP(cfg, tp) if cfg.family == "llama" else GeluMLP(cfg, tp)
