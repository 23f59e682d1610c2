"""Activation memory: bytes saved for backward per transformer layer and per model.

Two models of the same quantity:

- :func:`korthikanti_layer_bytes`, Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models"), Table 2, for a GPT layer of sequence s,
  micro-batch b, hidden h, a heads, tensor-parallel size t. Their assumptions: 16-bit
  activations, 1-byte dropout masks, an unfused attention core (its softmax, mask and
  dropped scores kept: 5as^2b), LayerNorm, GELU:

  ============================  =========================
  none (t = 1)                  sbh (34 + 5as/h)            (their Eq. 1)
  tensor parallel               sbh (10 + 24/t + 5as/(ht))
  tensor + sequence parallel    sbh (34/t + 5as/(ht))
  tp + selective recompute      sbh (10 + 24/t)
  tp + sp + selective           sbh (34/t)
  full recompute                2sbh  (2sbh/t with sp)
  ============================  =========================

- :func:`layer_activation_bytes`, the same accounting for loom's own layer (what
  ``loom.parallel.memory.ActivationMeter`` measures), with its dtypes as parameters: the
  residual stream in the parameters' dtype (fp32 under autocast: norms, residual sums and,
  after a biased row-parallel linear, dropout inputs), linear inputs and outputs in the
  compute dtype, one-byte dropout masks (:mod:`loom.model.dropout`), and the attention core
  as it runs: ``dropout`` (loom's core, :mod:`loom.model.dropout_attention`, with dropout off
  CUDA: q, k and v in the compute dtype, the probabilities in fp32 and their one-byte mask over
  the causal triangle's row runs (:func:`loom.attention_walk.causal_run_scores`, s(s + run)/2 a head):
  c(sbh + 2 sb h_kv)/t + 5ab s(s + run)/2t, then the output projection's input copied out of the
  heads' layout) or ``flash`` (q, k, v and the output in the compute dtype,
  the output projection reading the output in place, plus an fp32 log-sum-exp per head and
  position). The sparse cores: ``sparse_cpp`` (loom's C++ kernel) keeps what ``flash`` keeps,
  K and V expanded to every query head; ``sparse`` (FlexAttention, the torch-ops kernel) the same
  with the output projection's input a copy, and the torch-ops kernel also the probabilities of
  its padded slots where a row is narrow. Under
  tensor parallelism everything inside a region is 1/t; with sequence parallelism the
  norms', dropouts' and linear inputs' terms are 1/t too (loom saves the column-parallel
  inputs as this rank's slice, as Megatron-LM 3).

All sizes in bytes. ``E = s*b*h`` is one (sequence, batch, hidden) activation.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.attention_walk import causal_run_scores

POLICIES = ("none", "full", "selective")


def korthikanti_layer_bytes(
    s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False, recompute: str = "none"
) -> float:
    """Korthikanti et al. 2022, Table 2 (see the module docstring), bytes per layer per tp rank."""
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    core = 0.0 if recompute == "selective" else 5 * a * s / (h * t)
    if sp:
        return sbh * (34 / t + core)
    return sbh * (10 + 24 / t + core)


@dataclass(frozen=True)
class LayerShape:
    """One transformer layer as loom builds it (``ModelConfig``'s fields)."""

    family: str  # gpt2 (LayerNorm, GELU, biases) or llama (RMSNorm, SwiGLU, RoPE)
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    bias: bool
    dropout: float
    top_k: int = 32  # attention = "topk": the scores each query keeps
    lsh: tuple[int, int, bool] = (2, 64, True)  # attention = "lsh": rounds, chunk, shared QK
    # attention = "sparse": key columns per query whose probabilities the torch-ops kernel keeps
    sparse_columns: int = 0


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element: the parameters' (the residual stream's) and the compute dtype's.
    Dropout masks are one byte (uint8 on CPU, bool on CUDA)."""

    params: int = 4
    compute: int = 4


def attention_kernel(device: str, dropout: float, attention: str = "dense", sparse_kernel: str = "auto") -> str:
    """Which core runs: loom's kernel for ``attention`` sparse, topk or lsh (``sparse_cpp`` for the
    C++ block-sparse kernel: on CPU unless ``model.sparse_attention.kernel`` is torch); with
    dropout off CUDA loom's dropout core; else scaled_dot_product_attention's fused one."""
    if attention == "sparse" and device == "cpu" and sparse_kernel != "torch":
        return "sparse_cpp"
    if attention in ("sparse", "topk", "lsh"):
        return attention
    return "dropout" if device != "cuda" and dropout > 0 else "flash"


def computed_fraction(kernel: str, device: str, s: int) -> float:
    """The fraction of the s x s attention scores a dense causal kernel computes, for the step time
    (FLOP counts for MFU and HFU keep the whole square, as Narayanan et al. and Korthikanti et al.
    count). A causal kernel takes each tile of queries against the keys up to its last position,
    whole key tiles at a time:

    - ``dropout`` (loom's core): :func:`loom.attention_walk.causal_runs`' row runs, keys up to each
      run's end (:func:`loom.attention_walk.causal_run_scores` / s^2);
    - ``flash`` on CUDA: query tiles of 128 (FlashAttention-2's), keys up to each tile's end;
    - ``flash`` elsewhere (torch's CPU kernel): query tiles of 32, 64 or 256 (below 192 tokens,
      below 768, beyond), key tiles of 512. Measured here, its causal call takes 0.89, 0.65 and
      0.54 of the non-causal call's time at 1k, 2k and 4k tokens; this gives 0.75, 0.63, 0.56.

    Other kernels: 1 (sparse layouts count their own density; top-k and LSH are not modelled)."""
    if kernel == "dropout":
        return causal_run_scores(s) / (s * s)
    if kernel != "flash":
        return 1.0
    if device == "cuda":
        query, key = 128, 1
    else:
        query, key = (32 if s < 192 else 64 if s < 768 else 256), 512
    seen = 0
    for r in range(0, s, query):
        end = min(r + query, s)
        seen += (end - r) * min(-(-end // key) * key, s)
    return seen / (s * s)


def layer_activation_bytes(
    shape: LayerShape,
    s: int,
    b: int,
    t: int = 1,
    sp: bool = False,
    recompute: str = "none",
    dtypes: Dtypes = Dtypes(),
    kernel: str = "flash",
) -> float:
    """Bytes one loom layer saves for backward per micro-batch on one tp rank (module docstring)."""
    if recompute not in POLICIES:
        raise ValueError(f"recompute must be one of {POLICIES}, got {recompute!r}")
    r, c = dtypes.params, dtypes.compute
    e = s * b * shape.hidden
    d = t if sp else 1  # the split of what lies outside the tp regions
    if recompute == "full":
        return r * e / d  # the block's input
    head_dim = shape.hidden // shape.heads
    e_kv = s * b * shape.kv_heads * head_dim
    llama = shape.family == "llama"
    norm = (2 * r * e + 4 * s * b) / d if llama else (r * e + 8 * s * b) / d  # RMSNorm: x and x*rstd; LN: x, mean, rstd
    mask = 0.0 if not shape.dropout else e / d  # one byte an element
    rope = 4 * s * head_dim * c if llama else 0  # cos and sin, for q and for k
    if recompute == "selective":  # the recomputed region keeps q, k and v (shared-QK LSH: no k)
        core = c * (e + (1 if kernel == "lsh" and shape.lsh[2] else 2) * e_kv) / t
    elif kernel == "dropout":  # q, k, v as given; the probabilities in fp32 and their uint8 mask,
        # over the causal triangle's row runs
        core = (c * (e + 2 * e_kv) + 5 * shape.heads * causal_run_scores(s) * b) / t
    elif kernel == "sparse" and shape.sparse_columns:  # the torch-ops kernel: q, k and v (K/V expanded
        # to every query head), and the probabilities of each query's padded slots in fp32
        # (loom.model.block_sparse keeps them when a row spans at most loom.attention_walk.SAVED_COLUMNS
        # keys): linear in s
        core = c * 3 * e / t + 4 * shape.heads * s * b * shape.sparse_columns / t
    elif kernel in ("sparse", "sparse_cpp"):  # the C++ kernel (loom.model.block_sparse_cpp),
        # FlexAttention, and the torch-ops kernel's wide rows: q, k, v, out, and the log-sum-exp
        # (the probabilities recomputed): linear in s, whatever the layout
        core = c * 4 * e / t + 4 * shape.heads * s * b / t
    elif kernel == "lsh":
        core = _lsh_core_bytes(shape, s, b, t, c)
    elif kernel == "topk":  # q, k, v (expanded), out, and each query's picks: indices (int64) and
        # probabilities (loom.model.topk_attention)
        core = c * 4 * e / t + (8 + c) * shape.heads * s * b * min(shape.top_k, s) / t
    else:  # q, k, v, out and the log-sum-exp; out is laid out (b, s, heads, d), so the output
        # projection's input is a view of it, not a copy
        core = c * (2 * e + 2 * e_kv) / t + 4 * shape.heads * s * b / t
    # a column-parallel input: one saved slice under tp; at t = 1 under autocast (16-bit compute over
    # fp32 parameters) each linear casts, and keeps, its own copy (Q, K, V; GELU's up or SwiGLU's gate and up)
    casts = t == 1 and c != r
    projections = 2 if kernel == "lsh" and shape.lsh[2] else 3  # Q, K, V (shared-QK LSH: Q, V)
    qkv_in = c * e / d * (projections if casts else 1)
    mlp_in = c * e / d * ((2 if llama else 1) if casts else 1)
    # flash and the C++ sparse kernel lay their output out (b, s, heads, d): the output
    # projection's input is a view of it
    out_proj_in = 0.0 if kernel in ("flash", "sparse_cpp") and recompute == "none" else c * e / t
    attention = norm + qkv_in + rope + core + out_proj_in + mask
    f = s * b * shape.ffn
    mlp_inner = 4 * c * f / t if llama else 2 * c * f / t  # SwiGLU: gate, up, silu, product; GELU: in, out
    mlp = norm + mlp_in + mlp_inner + mask
    return attention + mlp


def _lsh_core_bytes(shape: LayerShape, s: int, b: int, t: int, c: int) -> float:
    """What LSH attention saves (loom.model.lsh_attention), per round: the sort and its inverse
    (int64), the sorted queries, keys and values with the previous chunk's (2x), each query's own
    value (and key without shared QK), the causal mask (bool), the scores with the own column and
    the log-sum-exp in fp32, the probabilities in fp32 (and their compute-dtype copy under
    autocast), the own column's weight; and under shared QK the queries (normalised into keys).
    An account, not an exact one like the other cores': within 5% of the measured bytes
    (tests/test_activation_memory.py)."""
    rounds, chunk, shared = shape.lsh
    e = s * b * shape.hidden / t
    tokens = s * b * shape.heads / t  # (batch, local heads, s) rows
    per_round = 16 * tokens + c * e * (6 if shared else 7) + 2 * chunk * tokens
    per_round += 4 * tokens * (2 * chunk + 1) + 4 * tokens + 4 * tokens * 2 * chunk + 4 * tokens
    per_round += (c * tokens * 2 * chunk if c != 4 else 0) + (0 if shared else 8 * tokens)
    return rounds * per_round + (c * e if shared else 0)
