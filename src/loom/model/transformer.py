"""The decoder-only transformer, one class for both families and every tensor-parallel size.

GPT-2: LayerNorm, learned positions, GELU MLP, biases, tied embeddings.
Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, untied head.
The family is a config field; nothing else differs.

Under tensor parallelism (``tp`` of size t) the same code builds this rank's shard:
vocabulary-parallel embedding and head, column/row-parallel attention and MLP. With
sequence parallelism the residual stream between tp regions is (batch, seq/t, hidden).
With t = 1 every mapping is the identity and the model is a plain module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.model.attention import Attention, rank_heads
from loom.model.dropout import Dropout
from loom.model.init import init_parameter
from loom.model.layers import RotaryEmbedding, make_mlp, make_norm
from loom.model.recompute import Recompute, recompute
from loom.model.reversible import reversible
from loom.model.sparse_layout import SparseLayout
from loom.parallel.placement import Placements, declare_replicated
from loom.parallel.random import ParallelRNG
from loom.parallel.tensor import ColumnParallelLinear, TensorParallel
from loom.parallel.vocab import VocabParallelEmbedding, padded_vocab, vocab_parallel_cross_entropy


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, sparse: SparseLayout | None = None) -> None:
        """``sparse``: the model's compiled sparse layout, shared by its blocks."""
        super().__init__()
        self.tp = tp
        self.attn_norm = make_norm(cfg, tp)
        self.attn = Attention(cfg, tp, sparse)
        self.mlp_norm = make_norm(cfg, tp)
        self.mlp = make_mlp(cfg, tp)
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None,
        positions: torch.Tensor,
        rng: ParallelRNG | None,
        recompute_core: bool = False,
    ) -> torch.Tensor:
        """``recompute_core``: the core attention's activations are recomputed in backward."""
        x = x + self.attention_branch(x, rope, positions, rng, recompute_core)
        return x + self.mlp_branch(x, rng)

    def attention_branch(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None,
        positions: torch.Tensor,
        rng: ParallelRNG | None,
        recompute_core: bool = False,
    ) -> torch.Tensor:
        """What the attention adds to the residual stream (reversible blocks' F)."""
        return self._dropout(self.attn(self.attn_norm(x), rope, positions, rng, recompute_core), rng)

    def mlp_branch(self, x: torch.Tensor, rng: ParallelRNG | None) -> torch.Tensor:
        """What the MLP adds to the residual stream (reversible blocks' G)."""
        return self._dropout(self.mlp(self.mlp_norm(x)), rng)

    def _dropout(self, x: torch.Tensor, rng: ParallelRNG | None) -> torch.Tensor:
        if not (self.training and self.resid_dropout.p):
            return x
        # replicated activations share one stream; a sequence slice (SP) is this rank's own
        stream = rng.tp_stream() if rng is not None and self.tp.sequence_parallel else contextlib.nullcontext()
        with stream:
            return self.resid_dropout(x)


class Transformer(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab shard of this tp rank).

    With tied embeddings the output projection reuses ``tok_emb.weight`` (no separate
    ``lm_head`` parameter), so the state dict never holds two names for one tensor.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        seed: int = 0,
        device: torch.device | str | None = None,
        tp: TensorParallel | None = None,
        rng: ParallelRNG | None = None,
        layers: Sequence[int] | None = None,
        embed: bool = True,
        head: bool = True,
        recompute: Recompute | None = None,
        meta: bool = False,
    ) -> None:
        """``meta``: parameters are built on the meta device (no memory) and left to whoever
        materialises them one at a time through :meth:`initial_value` (ZeRO-3 does, so a rank
        never holds the whole model); buffers are built on ``device`` either way."""
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (the trainer fills it from the tokenizer)")
        self.cfg = cfg
        self.tp = tp or TensorParallel.single()
        self.rng = rng
        self.recompute = recompute or Recompute()
        self.embed, self.head = embed, head
        self.layers = range(cfg.n_layers) if layers is None else layers
        device = torch.device(device or "cpu")
        self.seed = seed
        with torch.device("meta") if meta else device:  # parameters are created where they live
            # A pipeline stage builds only its own parts; the tied head on the last stage
            # keeps a copy of the embedding under the same name.
            need_emb = embed or (head and cfg.tied)
            self.tok_emb = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, self.tp) if need_emb else None
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if embed and cfg.family == "gpt2" else None
            if self.pos_emb is not None:  # under SP each rank adds its slice's positions
                declare_replicated(self.pos_emb, self.tp.size, self.tp.rank, self.tp.sequence_parallel)
            self.emb_dropout = Dropout(cfg.dropout)
            # keyed by the global layer index, so names (blocks.7.attn...) are the same in any layout
            # one sparse layout for every block: built and compiled once, not once a layer
            sparse = SparseLayout(cfg, rank_heads(cfg, self.tp)) if cfg.attention == "sparse" else None
            self.blocks = nn.ModuleDict({str(i): Block(cfg, self.tp, sparse) for i in self.layers})
            self.final_norm = make_norm(cfg, self.tp) if head else None
            self.lm_head = None
            if head and not cfg.tied:
                padded = padded_vocab(cfg.vocab_size, self.tp.size)
                self.lm_head = ColumnParallelLinear(cfg.d_model, padded, self.tp, bias=False, full_out=cfg.vocab_size)
        with device:
            self.rope = (
                RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg) if cfg.family == "llama" else None
            )
        # where each parameter lives, as its layer declared it; a tied embedding held by one end
        # of a pipeline has its other copy on the other end, and the first stage's counts
        self.placements = Placements.of_model(self)
        if cfg.tied and need_emb and embed != head:
            self.placements.replace("tok_emb.weight", tied=True, pp_owner=embed)
        self._ends_hooks: list[tuple[Callable[[], None], Callable[[torch.Tensor], None]]] = []
        if device.type != "meta" and not meta:
            self.reset_parameters(seed)

    def register_ends_hook(self, before: Callable[[], None], after: Callable[[torch.Tensor], None]) -> None:
        """Call ``before()`` ahead of every :meth:`run_stage` that embeds or applies the head, and
        ``after(output)`` once it returns (ZeRO-3 gathers the parameters no block owns around them:
        the head's use of a tied embedding reaches no module hook, so module hooks cannot)."""
        self._ends_hooks.append((before, after))

    def reset_parameters(self, seed: int) -> None:
        """Layout-independent init: every value is a function of (seed, name, full index)."""
        for name, param, place in self.placements.named():
            init_parameter(
                param, name, seed, self.cfg.init_std, self.cfg.n_layers, place.full_shape, place.rows, place.cols
            )

    def initial_value(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """This rank's initial value of parameter ``name`` (fp32), as :meth:`reset_parameters` sets it."""
        place, param = self.placements[name], self.placements.param(name)
        value = torch.empty(param.shape, dtype=torch.float32, device=device)
        init_parameter(
            value, name, self.seed, self.cfg.init_std, self.cfg.n_layers, place.full_shape, place.rows, place.cols
        )
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids -> logits (this rank's vocabulary shard), through every layer it holds."""
        return self.run_stage(x, self.layers, self.embed, self.head)

    def run_stage(self, x: torch.Tensor, layers: Sequence[int], embed: bool, head: bool) -> torch.Tensor:
        """One pipeline stage: token ids (if ``embed``) or hidden states, through ``layers``,
        then (if ``head``) the final norm and the output projection."""
        ends = self._ends_hooks if embed or head else ()
        for before, _ in ends:
            before()
        out = self._run_stage(x, layers, embed, head)
        for _, after in ends:
            after(out)
        return out

    def _run_stage(self, x: torch.Tensor, layers: Sequence[int], embed: bool, head: bool) -> torch.Tensor:
        seq = x.shape[1] * (self.tp.size if not embed and self.tp.sequence_parallel else 1)
        positions = torch.arange(seq, device=x.device)
        # dropout's masks are functions of (step, micro-batch, site) in any layout (loom.parallel.random);
        # reseeded outside a recomputed block, whose checkpoint then replays the same draws
        # (LSH draws its rotations from the same stream, in evaluation too)
        draws = (self.training and self.cfg.dropout) or self.cfg.attention == "lsh"
        reseed = self.rng.enter if self.rng is not None and draws else None
        if embed:
            x = self.tok_emb(x)  # replicated, or this rank's sequence slice under SP
            if self.pos_emb is not None:
                x = x + self.pos_emb(self.tp.local_positions(positions))
            if reseed:
                reseed("embed")
            x = self._emb_dropout(x)
        if self.cfg.reversible:
            x = self._reversible(x, layers, positions, reseed)
            layers = ()
        chosen = self.recompute.chosen(layers)
        for i in layers:
            block = self.blocks[str(i)]
            if reseed:
                reseed(i)
            if i in chosen and self.recompute.policy == "full":
                x = recompute(block, x, self.rope, positions, self.rng, rng=self.rng, store=self.tp.weight_grads)
            else:
                x = block(x, self.rope, positions, self.rng, recompute_core=i in chosen)
        if not head:
            return x
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        # an untied head's weight is read here alone (its dW may be written into DDP's bucket); a tied one is the embedding's too
        (logits,) = self.tp.enter_linear(self.final_norm(x), [weight], own=self.lm_head is not None)
        return logits

    def _reversible(
        self, x: torch.Tensor, layers: Sequence[int], positions: torch.Tensor, reseed: Callable | None
    ) -> torch.Tensor:
        """The stage's blocks as a reversible stack (loom.model.reversible): activations kept for
        backward do not grow with depth. Each block's attention branch reseeds its dropout first."""

        def branches(i: int) -> tuple[Callable, Callable]:
            block = self.blocks[str(i)]

            def attention(h: torch.Tensor) -> torch.Tensor:
                if reseed:
                    reseed(i)
                return block.attention_branch(h, self.rope, positions, self.rng)

            return attention, lambda h: block.mlp_branch(h, self.rng)

        params = [p for i in layers for p in self.blocks[str(i)].parameters()]
        return reversible(x, [branches(i) for i in layers], params, self.rng)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over all positions (fp32), never gathering the vocabulary."""
        return self.loss_from_logits(self(idx), targets)

    def loss_from_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1 and logits.shape[-1] == self.cfg.vocab_size:
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        # rank r's logit columns are padded ids [r * P/t, (r+1) * P/t), whichever module made them
        # (an untied head on a last pipeline stage has no embedding to ask)
        vocab_start = self.tp.rank * logits.shape[-1]
        return vocab_parallel_cross_entropy(logits, targets, self.tp, vocab_start, self.cfg.vocab_size)

    def stage_parameters(self, layers: Sequence[int], embed: bool, head: bool) -> list[nn.Parameter]:
        """The parameters one stage's forward uses (for its weight-gradient step)."""
        modules: list[nn.Module] = [self.blocks[str(i)] for i in layers]
        if embed:
            modules += [m for m in (self.tok_emb, self.pos_emb) if m is not None]
        if head:
            modules += [m for m in (self.final_norm, self.lm_head) if m is not None]
            if self.lm_head is None and not embed:
                modules.append(self.tok_emb)
        seen, params = set(), []
        for module in modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def _emb_dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.emb_dropout.p):
            return x
        stream = (
            self.rng.tp_stream() if self.rng is not None and self.tp.sequence_parallel else contextlib.nullcontext()
        )
        with stream:
            return self.emb_dropout(x)

    def num_params(self) -> int:
        """Parameters held by this rank (the whole model when tp = 1)."""
        return sum(p.numel() for p in self.parameters())
