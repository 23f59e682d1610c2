"""Random streams for dropout: the same masks in every layout but tp's own draws.

Two streams, reseeded where each dropout site starts (the embedding, each block) for each
micro-batch, as pure functions of (seed, step, global micro-batch, site):

- the *shared* stream (torch's default generator), the same on every tp rank of a dp
  replica: dropout on replicated activations must drop the same elements everywhere;
- the *tp* stream, also keyed by the tp rank: dropout on what a rank holds alone (its
  attention heads, its slice of the sequence under SP) must differ between ranks.

The global micro-batch is ``dp_rank x micro-batches per rank + k``, the rows
``loom.train.batches.batch_rows`` gives it, so dp, accumulation and pipeline stages (which
run a block wherever and whenever the schedule says) draw exactly the masks of the single
process. tp = 2 equals tp = 1 in distribution only (each rank draws its part's masks, as
Megatron-LM), and every run is reproducible. A recomputed block redraws the masks of its
first pass: the checkpoint restores the shared stream, :meth:`ParallelRNG.recompute_contexts`
the tp stream, both as they were after the block's reseed.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def stream_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python runs)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ParallelRNG:
    def __init__(self, device: torch.device, dp_rank: int = 0, tp_rank: int = 0) -> None:
        self.device = device
        self.dp_rank = dp_rank
        self.tp_rank = tp_rank
        self._tp_state: torch.Tensor | None = None
        self._step: tuple[int, int, int] | None = None  # seed, step, micro-batches per dp rank
        self._microbatch = 0

    def reseed(self, seed: int, step: int, per_rank: int = 1) -> None:
        """Start step ``step`` with ``per_rank`` micro-batches on each dp rank, at micro-batch 0."""
        self._step = (seed, step, per_rank)
        self.microbatch(0)
        self.enter("step")

    def microbatch(self, k: int) -> None:
        """The next forward is this dp rank's micro-batch ``k``."""
        per_rank = self._step[2] if self._step is not None else 1
        self._microbatch = self.dp_rank * per_rank + k

    def enter(self, site: object) -> None:
        """A dropout site starts (``"embed"``, a block's global index): both streams become
        functions of (seed, step, global micro-batch, site), the tp stream of the tp rank too."""
        if self._step is None:
            return
        seed, step, _ = self._step
        self._seed(stream_seed(seed, "dropout", step, self._microbatch, site))
        with torch.random.fork_rng(devices=self._cuda()):
            self._seed(stream_seed(seed, "dropout-tp", step, self._microbatch, site, self.tp_rank))
            self._tp_state = self._get()

    def _seed(self, seed: int) -> None:
        """Seed the generator dropout draws from on this device (and the CPU's), as
        ``torch.manual_seed`` does for those two, without its per-call bookkeeping for every
        other device type (a formatted stack per call, ~0.5 ms a step)."""
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    @contextlib.contextmanager
    def tp_stream(self) -> Iterator[None]:
        """Draw from this tp rank's own stream inside the block."""
        if self._tp_state is None:
            yield
            return
        with torch.random.fork_rng(devices=self._cuda()):
            self._set(self._tp_state)
            yield
            self._tp_state = self._get()

    def recompute_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """(forward, recomputation) contexts for one checkpointed region (``context_fn``): the
        recomputation draws from the tp stream as it stood when the forward entered the region,
        so its dropout masks equal the first pass's; the stream then goes on from where it was."""
        entered: dict = {}

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            entered["state"] = self._tp_state
            yield

        @contextlib.contextmanager
        def recomputation() -> Iterator[None]:
            current = self._tp_state
            self._tp_state = entered.get("state", current)
            try:
                yield
            finally:
                self._tp_state = current

        return forward(), recomputation()

    def _cuda(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)
