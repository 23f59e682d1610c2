"""Parameter counts from the config alone, without building the model.

Per layer: attention 2d^2 + 2d*kv (Q, O and K, V; kv = n_kv_heads * head_dim; shared-QK LSH
attention has no K: d*kv),
MLP 2*d*f (GELU) or 3*d*f (SwiGLU), two norms; plus embeddings, learned positions
(gpt2), the final norm and an untied head.
"""

from __future__ import annotations

from loom.config import ModelConfig
from loom.parallel.pipeline.partition import rank_stages
from loom.parallel.vocab import padded_vocab


def count_parameters(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    vocab = vocab_size or cfg.vocab_size
    if vocab is None:
        raise ValueError("vocab_size is needed to count parameters")
    d, f, kv = cfg.d_model, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim
    bias = cfg.use_bias
    norm = d * (2 if cfg.family == "gpt2" and bias else 1)  # LayerNorm has a bias, RMSNorm none
    projections = 1 if cfg.attention == "lsh" and cfg.lsh_shared_qk else 2  # K and V, or V alone
    attention = 2 * d * d + projections * (d * kv + (kv if bias else 0)) + (2 * d if bias else 0)
    mlp_mats = 3 if cfg.family == "llama" else 2
    mlp = mlp_mats * d * f + ((mlp_mats - 1) * f + d if bias else 0)
    layer = attention + mlp + 2 * norm
    embeddings = vocab * d + (cfg.max_seq_len * d if cfg.family == "gpt2" else 0)
    head = 0 if cfg.tied else vocab * d
    return cfg.n_layers * layer + embeddings + norm + head


def count_rank_parameters(cfg: ModelConfig, tp: int = 1, pp: int = 1, vp: int = 1, pp_rank: int = 0) -> int:
    """Parameters one rank holds, as loom builds its shard: column-parallel weights and biases
    split t ways (a K/V head replicated when t exceeds the KV heads), row-parallel weights split,
    their biases, the norms and learned positions replicated, the vocabulary padded to a
    multiple of t and split; the layers of its pipeline chunks, the embedding on the first
    stage, the final norm and head on the last (with a copy of a tied embedding there)."""
    vocab = cfg.vocab_size
    if vocab is None:
        raise ValueError("vocab_size is needed to count parameters")
    d, f = cfg.d_model, cfg.ffn_dim
    kv = cfg.kv_heads * cfg.head_dim
    kv_local = kv // tp if cfg.kv_heads % tp == 0 else cfg.head_dim
    bias = cfg.use_bias
    norm = d * (2 if cfg.family == "gpt2" and bias else 1)
    projections = 1 if cfg.attention == "lsh" and cfg.lsh_shared_qk else 2  # K and V, or V alone
    attention = (
        d * d // tp * 2 + projections * (kv_local * d + (kv_local if bias else 0)) + ((d // tp + d) if bias else 0)
    )
    mats = 3 if cfg.family == "llama" else 2
    mlp = mats * d * f // tp + (((mats - 1) * f // tp + d) if bias else 0)
    layer = attention + mlp + 2 * norm
    plans = rank_stages(cfg.n_layers, pp, vp, pp_rank)
    total = sum(len(plan.layers) for plan in plans) * layer
    embed_rows = padded_vocab(vocab, tp) // tp * d
    embeds, heads = any(p.embed for p in plans), any(p.head for p in plans)
    if embeds:
        total += embed_rows + (cfg.max_seq_len * d if cfg.family == "gpt2" else 0)
    if heads:
        total += norm + (embed_rows if not cfg.tied or not embeds else 0)
    return total
