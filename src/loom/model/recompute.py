"""Activation recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models"): a block's activations are dropped after its forward and computed
again in backward, trading one more forward of what is recomputed for its memory.

Policies (``train.recompute``), applied to the first ``count`` blocks of each pipeline chunk
(``train.recompute_layers``; all of them when it is not given; Megatron-LM's "block" method):

- ``none``: autograd keeps what every op saves, about sbh(34 + 5as/h) bytes per layer in
  16-bit with dropout (their Eq. 1);
- ``full``: a block keeps only its input (2sbh in 16-bit); everything inside it, its
  tensor-parallel collectives included, runs again in backward;
- ``selective``: only the core attention (QK^T, softmax, softmax dropout, attention over V)
  runs again: the 5as^2b term, the largest for long sequences and the cheapest to recompute.

Both are ``torch.utils.checkpoint`` (non-reentrant) around a region: the block for
``full``, the one core-attention call for ``selective`` (``scaled_dot_product_attention``, or with dropout
off CUDA :mod:`loom.model.dropout_attention`). The core
attention is a single call, so checkpointing it alone recomputes exactly Korthikanti's
selection; a dispatch-mode policy over the whole block would also have to decide about the
tensor-parallel collectives, which must never be replayed from a cache.

Recomputed dropout masks equal the first pass: torch's checkpoint restores the default
generator (the stream shared by a tp group), and :meth:`ParallelRNG.recompute_contexts`
the tp rank's own stream. Under zero-bubble the store of deferred weight gradients replays
too (:meth:`WeightGradStore.recompute_contexts`): the recomputed inputs of the block's
linears become the X their deferred dW needs. ZeRO-3 gathers a block's parameters in
backward before its recomputation runs (``loom.parallel.zero.gather``).

A region's inputs are what it keeps: the checkpoint saves them for backward through the
active saved-tensors hooks (the activation meter counts them there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from loom.parallel.random import ParallelRNG
from loom.parallel.weight_grad import WeightGradStore

POLICIES = ("none", "full", "selective")


@dataclass(frozen=True)
class Recompute:
    """What this rank recomputes: ``policy`` on the first ``count`` blocks of each chunk (None: all)."""

    policy: str = "none"
    count: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"recompute policy must be one of {POLICIES}, got {self.policy!r}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"recompute count must be >= 0, got {self.count}")

    def chosen(self, layers: Sequence[int]) -> frozenset[int]:
        """The blocks of one chunk (its ``layers``, in order) that recompute."""
        if self.policy == "none" or not torch.is_grad_enabled():
            return frozenset()
        return frozenset(layers if self.count is None else list(layers)[: self.count])

    def describe(self, layers_per_chunk: Sequence[int]) -> str:
        if self.policy == "none" or self.count == 0:
            return "recompute: none (every activation kept for backward)"
        what = {"full": "full blocks (each keeps only its input)", "selective": "the core attention"}[self.policy]
        chunks = ", ".join(str(n if self.count is None else min(self.count, n)) for n in layers_per_chunk)
        return f"recompute: {what}, in {chunks} of {', '.join(map(str, layers_per_chunk))} blocks per chunk"


def recompute(
    fn: Callable[..., torch.Tensor],
    *args,
    rng: ParallelRNG | None = None,
    store: WeightGradStore | None = None,
) -> torch.Tensor:
    """``fn(*args)``, its activations recomputed in backward (non-reentrant checkpoint)."""
    pairs = [obj.recompute_contexts for obj in (rng, store) if obj is not None]
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=lambda: _both(pairs))


def _both(pairs: list[Callable[[], tuple]]) -> tuple[contextlib.AbstractContextManager, ...]:
    """One (forward, recompute) context pair entering each given pair's."""
    made = [make() for make in pairs]
    return _stacked([f for f, _ in made]), _stacked([r for _, r in made])


@contextlib.contextmanager
def _stacked(contexts: list[contextlib.AbstractContextManager]):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield
