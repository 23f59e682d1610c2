"""Building blocks: normalisation, rotary embeddings, feed-forward networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig


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


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.use_bias)


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
    """GPT-2 feed-forward: down(gelu_tanh(up(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.use_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """Llama feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.use_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.use_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    return SwiGLUMLP(cfg) if cfg.family == "llama" else GeluMLP(cfg)
