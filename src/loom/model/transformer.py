"""The decoder-only transformer, one class for both families.

GPT-2: LayerNorm, learned positions, GELU MLP, biases, tied embeddings.
Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, untied head.
The family is a config field; nothing else differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.model.attention import Attention
from loom.model.init import init_parameter
from loom.model.layers import RotaryEmbedding, make_mlp, make_norm


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding | None, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, positions))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab).

    With tied embeddings the output projection reuses ``tok_emb.weight`` (no separate
    ``lm_head`` parameter), so the state dict never holds two names for one tensor.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, device: torch.device | str | None = None) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (the trainer fills it from the tokenizer)")
        self.cfg = cfg
        device = torch.device(device or "cpu")
        with device:  # parameters are created where they live; "meta" allocates nothing
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.family == "gpt2" else None
            self.emb_dropout = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.final_norm = make_norm(cfg)
            self.lm_head = None if cfg.tied else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.family == "llama" else None
        if device.type != "meta":
            self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """Layout-independent init: every value is a function of (seed, name, index)."""
        for name, param in self.named_parameters():
            init_parameter(param, name, seed, self.cfg.init_std, self.cfg.n_layers)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x, self.rope, positions)
        x = self.final_norm(x)
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over all positions (fp32 logits)."""
        logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
