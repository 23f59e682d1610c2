"""Counted collectives: every transfer goes through a :class:`Comm` and lands in a :class:`Ledger`.

A ``Comm`` wraps one torch process group (``"dp"``, ``"tp"``, ``"pp"``, ``"world"``...)
and behaves like ``torch.distributed`` on it: tensors are changed in place, ``src`` /
``dst`` are ranks *within the group*, ``async_op=True`` returns a :class:`Handle`. Each
call is recorded in the process's ``Ledger`` with the bytes this rank sends under the
algorithm's cost model, so a run's communication volume can be checked against formulas.
A group of size 1 moves nothing and records nothing.

The byte model and the ledger live in :mod:`loom.distributed.ledger`.

Averaging is a sum followed by an in-place division by ``n`` (gloo has no reliable
``AVG``). reduce_scatter and all_gather use the backend's fused single-tensor ops; where
a backend lacks them, reduce_scatter runs as all_reduce on a copy and all_gather as the
list form, the ledger still records the model's bytes, and the entry's ``note`` says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from loom.distributed.ledger import Ledger, LedgerEntry, exact_bytes, model_bytes

__all__ = ["Comm", "Handle", "Ledger", "LedgerEntry", "model_bytes", "REDUCE_OPS"]

REDUCE_OPS = ("sum", "max", "min", "avg")
_yield = getattr(os, "sched_yield", lambda: None)  # hand the core to a runnable thread (the backend's)
_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "avg": dist.ReduceOp.SUM}
# torch 2.13 names the fused single-tensor ops *_single; older releases call them *_tensor.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def settle(work, spin_s: float = 0.0) -> None:
    """``work.wait()``, after first polling ``work.is_completed()`` for up to ``spin_s`` seconds,
    yielding the core (``sched_yield``) between polls.

    A rank that blocks on a gloo collective sleeps on a condition variable until the backend's
    thread wakes it; on the 2-core host measured, a 1 MiB all-reduce issued right after a matmul
    took 1.5-1.7 ms so, 0.47 ms back to back, and the tp 2 trainer step's 9 forward all-reduces
    spent 13-16 ms after both ranks had arrived. Polling took that step from 97-107 ms to 88-94;
    polling without yielding made it slower (108-111 against 101-104 ms), the spinning rank
    keeping the backend's threads off its core. It pays only where the rank has a core of its
    own (:func:`loom.distributed.context.spin_budget`), and only for works whose
    ``is_completed`` turns true by itself (gloo's send, recv and reduce_scatter never do: their
    callers pass 0). Past ``spin_s`` it blocks as before, under the group's timeout.
    """
    if spin_s > 0:
        deadline = time.perf_counter() + spin_s
        while not work.is_completed() and time.perf_counter() < deadline:
            _yield()
    work.wait()


class Handle:
    """An asynchronous call in flight; :meth:`wait` completes it and its ledger entry
    (polling for up to ``spin_s`` seconds first: :func:`settle`)."""

    def __init__(
        self,
        work,
        ledger: Ledger | None,
        entry: LedgerEntry | None,
        then: Callable[[], None] | None = None,
        spin_s: float = 0.0,
    ) -> None:
        self._work = work
        self._ledger = ledger
        self._entry = entry
        self._then = then
        self._spin_s = spin_s
        self._done = False

    def wait(self) -> bool:
        """Block until the call is complete; safe to call more than once. Returns True."""
        if self._done:
            return True
        if self._work is not None:
            settle(self._work, self._spin_s)
        if self._then is not None:
            self._then()
        if self._ledger is not None and self._entry is not None:
            self._ledger.end(self._entry)
        self._done = True
        return True

    def is_completed(self) -> bool:
        """Whether :meth:`wait` has run (it still must be called to finish the bookkeeping)."""
        return self._done

    def settle_on_completion(self) -> Handle:
        """Take the call off the ledger's pending list as soon as the backend completes it
        (:meth:`Ledger.settle`), not at :meth:`wait`: for a call waited for much later, which
        a watchdog must not meanwhile take for a stuck one. Its bytes still count at
        :meth:`wait`. A backend whose work has no future leaves it pending until then."""
        if self._work is not None and self._ledger is not None and self._entry is not None:
            ledger, entry = self._ledger, self._entry
            try:
                future = self._work.get_future()
            except (RuntimeError, AttributeError):  # no future for this work
                return self
            future.add_done_callback(lambda _: ledger.settle(entry))
        return self


_DONE = Handle(None, None, None)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _unsupported(exc: Exception) -> bool:
    """Whether a backend refused an op it does not implement (as opposed to failing in it)."""
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or "not support" in text or "not implemented" in text


# ----------------------------------------------------------------------------- comm


class Comm:
    """Counted collectives on one process group.

    ``group`` is a torch ``ProcessGroup`` (None: the default world group) and ``ranks`` the
    global ranks in group order. ``fallback=True`` makes reduce_scatter and all_gather use
    their fallbacks even where the backend has the fused ops (it is switched on by itself
    the first time a backend refuses one); results are the same. ``spin_s``: how long a wait
    for an all-reduce, all-gather or broadcast polls before it blocks (:func:`settle`; 0: it blocks).
    """

    def __init__(
        self,
        name: str,
        group,
        ranks: Sequence[int],
        ledger: Ledger,
        fallback: bool = False,
        spin_s: float = 0.0,
    ) -> None:
        self.name = name
        self.group = group
        self.ranks = tuple(int(r) for r in ranks)
        self.ledger = ledger
        self.fallback = fallback
        self.spin_s = spin_s
        if len(set(self.ranks)) != len(self.ranks) or not self.ranks:
            raise ValueError(f"{name} group ranks must be distinct and non-empty, got {list(self.ranks)}")
        if ledger.rank not in self.ranks:
            raise ValueError(f"rank {ledger.rank} is not in the {name} group {list(self.ranks)}")
        self._rank = self.ranks.index(ledger.rank)
        if len(self.ranks) > 1 and dist.is_initialized():
            actual = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
            if list(actual) != list(self.ranks):
                raise ValueError(
                    f"{name} group: given ranks {list(self.ranks)} but the process group holds {list(actual)}"
                )

    @classmethod
    def world(cls, ledger: Ledger, name: str = "world") -> Comm:
        """The default process group (every rank), or a one-rank group when none is running."""
        size = dist.get_world_size() if dist.is_initialized() else 1
        ranks = range(size) if size > 1 else [ledger.rank]
        return cls(name, None, ranks, ledger)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's index in the group."""
        return self._rank

    def __repr__(self) -> str:
        return f"Comm({self.name!r}, ranks={list(self.ranks)}, rank={self._rank})"

    # -- plumbing ------------------------------------------------------------------------

    def _check_op(self, op: str, t: torch.Tensor) -> None:
        if op not in _TORCH_OPS:
            raise ValueError(f"reduce op must be one of {REDUCE_OPS}, got {op!r}")
        if op == "avg" and not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"op='avg' needs a floating-point tensor, got {t.dtype}")

    def _peer(self, group_rank: int, what: str) -> int:
        if not 0 <= group_rank < self.size:
            raise ValueError(f"{what}={group_rank} is not a rank of the {self.name} group (size {self.size})")
        return self.ranks[group_rank]

    def _begin(self, op: str, numel: int, t: torch.Tensor, tag: str, root: int = 0, note: str = "") -> LedgerEntry:
        exact = exact_bytes(op, self.size, numel * t.element_size(), self._rank, root)
        return self.ledger.begin(op, self.name, self.ranks, numel, _dtype_name(t), exact, tag, note)

    def _launch_async(self, async_op: bool, polls: bool) -> bool:
        """Whether to launch a call asynchronously: asked to, or to poll it (:func:`settle`)."""
        return async_op or (polls and self.spin_s > 0)

    def _finish(
        self, work, entry: LedgerEntry, async_op: bool, then: Callable[[], None] | None = None, polls: bool = False
    ) -> Handle | None:
        """The call's Handle (``async_op``), or wait for it (polling first if ``polls``: its
        work reports completion by itself) and close its ledger entry."""
        spin_s = self.spin_s if polls else 0.0
        if async_op:
            return Handle(work, self.ledger, entry, then, spin_s)
        if work is not None:  # launched asynchronously (a fallback, or to poll)
            settle(work, spin_s)
        if then is not None:
            then()
        self.ledger.end(entry)
        return None

    def _local(self, async_op: bool, then: Callable[[], None] | None = None) -> Handle | None:
        """A one-rank group: do the local copy torch would, record nothing."""
        if then is not None:
            then()
        return _DONE if async_op else None

    def _divider(self, t: torch.Tensor, op: str) -> Callable[[], None] | None:
        if op != "avg":
            return None
        n = self.size
        return lambda: t.div_(n)

    # -- collectives ---------------------------------------------------------------------

    def all_reduce(
        self, t: torch.Tensor, op: str = "sum", async_op: bool = False, tag: str = "", poll: bool = True
    ) -> Handle | None:
        """Reduce ``t`` over the group, in place on every rank. Sends 2(n-1)/n * S.

        ``poll``: its wait may poll first (:func:`settle`, where the group's ``spin_s`` allows).
        False for a wait that finds the cores busy with the backend's own work, where a polling
        rank takes their time (DDP's last buckets after backward, :mod:`loom.parallel.ddp`)."""
        self._check_op(op, t)
        if self.size == 1:
            return self._local(async_op)
        entry = self._begin("all_reduce", t.numel(), t, tag)
        work = dist.all_reduce(t, op=_TORCH_OPS[op], group=self.group, async_op=self._launch_async(async_op, poll))
        return self._finish(work, entry, async_op, self._divider(t, op), polls=poll)

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, op: str = "sum", async_op: bool = False, tag: str = ""
    ) -> Handle | None:
        """Reduce ``input`` (the concatenation of ``size`` chunks) and keep chunk ``rank`` in
        ``output``. Sends (n-1)/n * S, S the input's bytes."""
        self._check_op(op, input)
        n = self.size
        if input.numel() != n * output.numel():
            raise ValueError(
                f"reduce_scatter input has {input.numel()} elements, expected "
                f"{n} x {output.numel()} (group size x output)"
            )
        if n == 1:
            return self._local(async_op, lambda: output.copy_(input.reshape(output.shape)))
        divide = self._divider(output, op)
        if not self.fallback:
            entry = self._begin("reduce_scatter", input.numel(), input, tag)
            try:
                work = _reduce_scatter_single(output, input, op=_TORCH_OPS[op], group=self.group, async_op=async_op)
            except (RuntimeError, NotImplementedError) as exc:
                if not _unsupported(exc):
                    raise
                self.fallback = True
                entry.note = "fallback: all_reduce"
            else:
                return self._finish(work, entry, async_op, divide)
        else:
            entry = self._begin("reduce_scatter", input.numel(), input, tag, note="fallback: all_reduce")
        full = input.detach().clone()
        work = dist.all_reduce(full, op=_TORCH_OPS[op], group=self.group, async_op=self._launch_async(async_op, True))
        m = output.numel()

        def take_chunk() -> None:
            output.copy_(full.reshape(-1)[self._rank * m : (self._rank + 1) * m].reshape(output.shape))
            if divide is not None:
                divide()

        return self._finish(work, entry, async_op, take_chunk, polls=True)

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False, tag: str = ""
    ) -> Handle | None:
        """Concatenate every rank's ``input`` into ``output`` (group order). Sends (n-1)/n * S,
        S the output's bytes."""
        n = self.size
        if output.numel() != n * input.numel():
            raise ValueError(
                f"all_gather output has {output.numel()} elements, expected {n} x {input.numel()} (group size x input)"
            )
        if n == 1:
            return self._local(async_op, lambda: output.copy_(input.reshape(output.shape)))
        if not self.fallback:
            entry = self._begin("all_gather", output.numel(), output, tag)
            try:
                launch = self._launch_async(async_op, True)
                work = _all_gather_single(output, input, group=self.group, async_op=launch)
            except (RuntimeError, NotImplementedError) as exc:
                if not _unsupported(exc):
                    raise
                self.fallback = True
                entry.note = "fallback: all_gather (list)"
            else:
                return self._finish(work, entry, async_op, polls=True)
        else:
            entry = self._begin("all_gather", output.numel(), output, tag, note="fallback: all_gather (list)")
        pieces = [torch.empty_like(input) for _ in range(n)]
        work = dist.all_gather(pieces, input.contiguous(), group=self.group, async_op=async_op)

        def assemble() -> None:
            output.copy_(torch.cat([p.reshape(-1) for p in pieces]).reshape(output.shape))

        return self._finish(work, entry, async_op, assemble)

    def broadcast(self, t: torch.Tensor, src: int, async_op: bool = False, tag: str = "") -> Handle | None:
        """Copy group rank ``src``'s ``t`` to every rank. Sends S, 0 on the chain's last rank."""
        source = self._peer(src, "src")
        if self.size == 1:
            return self._local(async_op)
        entry = self._begin("broadcast", t.numel(), t, tag, root=src)
        work = dist.broadcast(t, src=source, group=self.group, async_op=self._launch_async(async_op, True))
        return self._finish(work, entry, async_op, polls=True)

    def reduce(
        self, t: torch.Tensor, dst: int, op: str = "sum", async_op: bool = False, tag: str = ""
    ) -> Handle | None:
        """Reduce ``t`` onto group rank ``dst`` (other ranks' ``t`` is left as torch leaves it)."""
        self._check_op(op, t)
        target = self._peer(dst, "dst")
        if self.size == 1:
            return self._local(async_op)
        entry = self._begin("reduce", t.numel(), t, tag, root=dst)
        work = dist.reduce(t, dst=target, op=_TORCH_OPS[op], group=self.group, async_op=async_op)
        divide = self._divider(t, op) if self._rank == dst else None
        return self._finish(work, entry, async_op, divide)

    def scatter(
        self, output: torch.Tensor, inputs: list[torch.Tensor] | None, src: int, async_op: bool = False, tag: str = ""
    ) -> Handle | None:
        """Group rank ``src`` sends ``inputs[i]`` to rank ``i``; ``inputs`` is None elsewhere."""
        source = self._peer(src, "src")
        if self._rank == src and (inputs is None or len(inputs) != self.size):
            raise ValueError(f"scatter source needs {self.size} input tensors")
        if self.size == 1:
            return self._local(async_op, lambda: output.copy_(inputs[0]))
        entry = self._begin("scatter", self.size * output.numel(), output, tag, root=src)
        work = dist.scatter(
            output, inputs if self._rank == src else None, src=source, group=self.group, async_op=async_op
        )
        return self._finish(work, entry, async_op)

    def gather(
        self, t: torch.Tensor, outputs: list[torch.Tensor] | None, dst: int, async_op: bool = False, tag: str = ""
    ) -> Handle | None:
        """Group rank ``dst`` receives every rank's ``t`` into ``outputs``; None elsewhere."""
        target = self._peer(dst, "dst")
        if self._rank == dst and (outputs is None or len(outputs) != self.size):
            raise ValueError(f"gather destination needs {self.size} output tensors")
        if self.size == 1:
            return self._local(async_op, lambda: outputs[0].copy_(t))
        entry = self._begin("gather", self.size * t.numel(), t, tag, root=dst)
        work = dist.gather(t, outputs if self._rank == dst else None, dst=target, group=self.group, async_op=async_op)
        return self._finish(work, entry, async_op)

    def all_to_all(
        self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False, tag: str = ""
    ) -> Handle | None:
        """Rank i's piece j of ``input`` becomes rank j's piece i of ``output`` (equal splits)."""
        if input.numel() != output.numel() or input.numel() % self.size:
            raise ValueError(
                f"all_to_all needs equal input and output sizes divisible by "
                f"{self.size}, got {input.numel()} and {output.numel()}"
            )
        if self.size == 1:
            return self._local(async_op, lambda: output.copy_(input))
        entry = self._begin("all_to_all", input.numel(), input, tag)
        work = dist.all_to_all_single(output, input, group=self.group, async_op=async_op)
        return self._finish(work, entry, async_op)

    def barrier(self) -> None:
        """Wait for every rank of the group (recorded, 0 bytes)."""
        if self.size == 1:
            return
        entry = self.ledger.begin("barrier", self.name, self.ranks, 0, "", 0)
        dist.barrier(group=self.group)
        self.ledger.end(entry)

    # -- point to point ------------------------------------------------------------------

    def _check_peer(self, peer: int, what: str) -> int:
        target = self._peer(peer, what)
        if peer == self._rank:
            raise ValueError(f"{what}={peer} is this rank itself in the {self.name} group")
        return target

    def send(self, t: torch.Tensor, dst: int, tag: str = "") -> None:
        """Send ``t`` to group rank ``dst``. Sends S."""
        self.isend(t, dst, tag).wait()

    def recv(self, t: torch.Tensor, src: int, tag: str = "") -> None:
        """Receive into ``t`` from group rank ``src``. Sends 0."""
        self.irecv(t, src, tag).wait()

    def isend(self, t: torch.Tensor, dst: int, tag: str = "") -> Handle:
        target = self._check_peer(dst, "dst")
        entry = self._begin("send", t.numel(), t, tag)
        return Handle(dist.isend(t, dst=target, group=self.group), self.ledger, entry)

    def irecv(self, t: torch.Tensor, src: int, tag: str = "") -> Handle:
        source = self._check_peer(src, "src")
        entry = self._begin("recv", t.numel(), t, tag)
        return Handle(dist.irecv(t, src=source, group=self.group), self.ledger, entry)
