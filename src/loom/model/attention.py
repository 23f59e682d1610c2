"""Causal self-attention with grouped-query heads, through scaled_dot_product_attention (with
dropout off CUDA: :mod:`loom.model.dropout_attention`, loom's core with a fast mask), or
block-sparse (``model.attention = "sparse"``: :mod:`loom.sparsity`'s layout, this rank's heads'
part of it, through :mod:`loom.model.block_sparse_cpp` or :mod:`loom.model.block_sparse`).

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
from loom.model.block_sparse import flex_sparse_attention
from loom.model.dropout_attention import dropout_attention
from loom.model.layers import RotaryEmbedding
from loom.model.lsh_attention import lsh_attention
from loom.model.recompute import recompute
from loom.model.sparse_layout import SparseLayout
from loom.model.topk_attention import topk_attention
from loom.parallel.random import ParallelRNG
from loom.parallel.tensor import ColumnParallelLinear, RowParallelLinear, TensorParallel, shard_range


class Attention(nn.Module):
    """Q, K, V as separate column-parallel projections, output row-parallel."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, sparse: SparseLayout | None = None) -> None:
        """``sparse``: the model's compiled layout for this rank's heads, shared by its layers (a
        sparse model builds its own where none is given)."""
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
        # shared-QK LSH attention takes its keys from the queries: no key projection
        self.shared_qk = cfg.attention == "lsh" and cfg.lsh_shared_qk
        self.k_proj = None if self.shared_qk else ColumnParallelLinear(cfg.d_model, kv_dim, tp, bias=cfg.use_bias, **kv)
        self.v_proj = ColumnParallelLinear(cfg.d_model, kv_dim, tp, bias=cfg.use_bias, **kv)
        self.o_proj = RowParallelLinear(cfg.d_model, cfg.d_model, tp, bias=cfg.use_bias)
        self.kind, self.top_k = cfg.attention, cfg.top_k
        self.lsh = (cfg.n_heads, cfg.lsh_hashes, cfg.lsh_buckets, cfg.lsh_chunk)
        self.heads = rank_heads(cfg, tp)
        # sparse: this rank's heads' layout, compiled per sequence length (the model's, shared by its layers)
        self.sparse: SparseLayout | None = None
        if cfg.attention == "sparse":
            self.sparse = sparse if sparse is not None else SparseLayout(cfg, self.heads)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None,
        positions: torch.Tensor,
        rng: ParallelRNG | None = None,
        recompute_core: bool = False,
    ) -> torch.Tensor:
        """``recompute_core``: the core attention (QK^T, softmax, dropout, over V) keeps only
        q, k and v for backward and runs again there (selective recomputation): a checkpoint
        around it, or for loom's dropout core its own recomputation, which skips the product with V."""
        if self.shared_qk:
            (q, v), k = self.tp.enter_columns(x, self.q_proj, self.v_proj), None
        else:
            q, k, v = self.tp.enter_columns(x, self.q_proj, self.k_proj, self.v_proj)
        batch, seq, _ = q.shape
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, -1, self.head_dim).transpose(1, 2) if k is not None else None
        v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q = rope(q, positions)
            k = rope(k, positions) if k is not None else None
        if recompute_core and self._dropout_core(q):  # recomputes its own probabilities, not their product with v
            out = self._core(q, k, v, rng, recompute=True)
        elif recompute_core:
            out = recompute(self._core, q, k, v, rng, rng=rng)
        else:
            out = self._core(q, k, v, rng)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def _dropout_core(self, q: torch.Tensor) -> bool:
        """Whether :meth:`_core` runs loom's dropout core (dense attention, dropout on, off CUDA)."""
        dense = self.sparse is None and self.kind not in ("lsh", "topk")
        return dense and bool(self.dropout if self.training else 0.0) and q.device.type != "cuda"

    def _core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rng: ParallelRNG | None, recompute: bool = False
    ) -> torch.Tensor:
        """softmax(QK^T / sqrt(d) + causal mask), dropped out, times V: (batch, heads, seq, head_dim).
        ``recompute``: the dropout core keeps only q, k, v and recomputes itself in backward."""
        if self.sparse is not None:
            return self._sparse_core(q, k, v)
        if self.kind == "lsh":
            return self._lsh_core(q, k, v)
        if self.kind == "topk":  # no dropout on its probabilities (residual and embedding dropout apply)
            k, v = _expand(k, v, q.shape[1])
            return topk_attention(q, k, v, self.top_k)
        dropout = self.dropout if self.training else 0.0
        # this rank's heads are its own: their dropout draws from the tp stream
        stream = rng.tp_stream() if dropout and rng is not None else contextlib.nullcontext()
        with stream:
            if self._dropout_core(q):  # no fused kernel with dropout here: loom's core
                return dropout_attention(q, k, v, dropout, recompute)
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
            )

    def _lsh_core(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """Reformer's LSH attention. Fresh rotations every forward, drawn for all heads from the
        shared stream (reseeded per block and micro-batch: every layout draws the same; a
        recomputed block redraws its first pass's) and cut to this rank's heads. A sequence
        that is not a whole number of chunks (generation) is padded at the end: causality keeps
        the padding from every real position. No dropout on the attention probabilities."""
        heads, hashes, buckets, chunk = self.lsh
        rotations = torch.randn(heads, q.shape[-1], hashes, buckets // 2, device=q.device)[self.heads]
        if k is not None:
            k, v = _expand(k, v, q.shape[1])
        else:
            v = _expand(v, v, q.shape[1])[1]
        seq = q.shape[-2]
        pad = -seq % chunk
        if pad:
            q, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, v))
            k = F.pad(k, (0, 0, 0, pad)) if k is not None else None
        return lsh_attention(q, k, v, rotations, chunk)[:, :, :seq]

    def _sparse_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layout's blocks only. A sequence of whole blocks runs FlexAttention with a BlockMask
        of the layout on CUDA, loom's block-sparse kernel elsewhere (:meth:`SparseLayout.attend`:
        the C++ one, or the one of torch ops); any other length (generation) dense attention under
        the layout's element mask, its top-left corner: a prefix attends as it does inside a
        longer sequence. No dropout on the attention probabilities here (residual and embedding
        dropout still apply)."""
        k, v = _expand(k, v, q.shape[1])
        seq = q.shape[-2]
        if seq % self.sparse.block == 0 and q.device.type == "cuda":  # FlexAttention, compiled, from the same layout
            return flex_sparse_attention(q, k, v, self.sparse.block_mask(seq, q.device))
        if seq % self.sparse.block == 0:  # loom's C++ kernel, or its torch-ops one
            return self.sparse.attend(q, k, v)
        mask = self.sparse.element_mask(seq, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0))


def rank_heads(cfg: ModelConfig, tp: TensorParallel) -> slice:
    """This tp rank's query heads: ``[rank x n_heads / t, (rank + 1) x n_heads / t)``."""
    per_rank = cfg.n_heads // tp.size
    return slice(tp.rank * per_rank, (tp.rank + 1) * per_rank)


def _expand(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query K/V heads repeated so each query head has its own (kernels without GQA)."""
    if k.shape[1] == heads:
        return k, v
    return k.repeat_interleave(heads // k.shape[1], dim=1), v.repeat_interleave(heads // v.shape[1], dim=1)
