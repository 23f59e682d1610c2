"""Building blocks: normalisation, rotary embeddings, feed-forward networks."""

from __future__ import annotations

import math

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

    Position p rotates pair k by angle p * f_k, f_k = theta^(-2k/head_dim), the frequencies
    optionally rescaled for a context longer than the one they were trained for
    (:func:`scale_frequencies`).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if cfg is not None and cfg.rope_scaling != "none":
            inv_freq = scale_frequencies(inv_freq, cfg)
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


def scale_frequencies(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """RoPE frequencies for a context ``rope_factor`` times the trained one (``rope_original_max_seq_len``).

    ``linear`` (position interpolation, Chen et al. 2023): every frequency divided by the factor.
    ``llama3`` (Llama 3.1): by wavelength lambda = 2 pi / f against the trained context L,
    low = L / rope_low_freq_factor and high = L / rope_high_freq_factor: wavelengths longer
    than low are interpolated (f / factor), shorter than high kept (f), and those between
    blended, f' = (1 - a) f / factor + a f with a = (L / lambda - low_freq_factor) /
    (high_freq_factor - low_freq_factor). Attention is not rescaled in either.
    """
    factor = cfg.rope_factor
    if cfg.rope_scaling == "linear":
        return inv_freq / factor
    low, high, original = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_seq_len
    wavelength = 2 * math.pi / inv_freq
    blend = (original / wavelength - low) / (high - low)
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    middle = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(middle, (1 - blend) * scaled / factor + blend * scaled, scaled)


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
