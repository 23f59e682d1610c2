"""Parameter counts from the config alone, without building the model.

Per layer: attention 2d^2 + 2d*kv (Q, O and K, V; kv = n_kv_heads * head_dim),
MLP 2*d*f (GELU) or 3*d*f (SwiGLU), two norms; plus embeddings, learned positions
(gpt2), the final norm and an untied head.
"""

from __future__ import annotations

from loom.config import ModelConfig


def count_parameters(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    vocab = vocab_size or cfg.vocab_size
    if vocab is None:
        raise ValueError("vocab_size is needed to count parameters")
    d, f, kv = cfg.d_model, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim
    bias = cfg.use_bias
    norm = d * (2 if cfg.family == "gpt2" and bias else 1)  # LayerNorm has a bias, RMSNorm none
    attention = 2 * d * d + 2 * d * kv + ((2 * d + 2 * kv) if bias else 0)
    mlp_mats = 3 if cfg.family == "llama" else 2
    mlp = mlp_mats * d * f + ((mlp_mats - 1) * f + d if bias else 0)
    layer = attention + mlp + 2 * norm
    embeddings = vocab * d + (cfg.max_seq_len * d if cfg.family == "gpt2" else 0)
    head = 0 if cfg.tied else vocab * d
    return cfg.n_layers * layer + embeddings + norm + head
