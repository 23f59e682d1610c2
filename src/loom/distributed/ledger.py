"""The ledger of collectives: what each call moved, under the algorithm's byte model.

Byte model. ``S`` is the message size in bytes, ``numel * element_size`` of the full
logical tensor (for reduce_scatter the input, for all_gather the output, for scatter and
gather all ``n`` pieces together); ``n`` is the group size; ranks are group ranks.

==============  ===========================================  ================================
op              bytes this rank sends                        algorithm
==============  ===========================================  ================================
all_reduce      2(n-1)/n * S                                 ring: reduce-scatter + all-gather
reduce_scatter  (n-1)/n * S                                  ring
all_gather      (n-1)/n * S                                  ring
all_to_all      (n-1)/n * S                                  direct, one piece to each peer
broadcast       S, but 0 for the last rank of the chain      pipelined chain src, src+1, ...
reduce          (n-1)/n * S on dst, (n-1)/n * S + S/n = S    ring reduce-scatter, then each
                elsewhere                                    rank sends its piece to dst
scatter         (n-1)/n * S on src, 0 elsewhere              src sends each peer its piece
gather          S/n off dst, 0 on dst                        each peer sends dst its piece
send            S                                            point to point
recv            0
barrier         0
==============  ===========================================  ================================

Arithmetic is exact: a value is an ``int`` when the formula gives a whole number of
bytes (always so for reduce_scatter, all_gather, all_to_all, scatter and gather, whose
``S`` is a multiple of ``n``) and a ``float`` otherwise (all_reduce of a tensor whose
size is not a multiple of ``n``). Totals are summed as exact fractions and reported the
same way, so ``2(n-1)/n * S`` summed over many calls has no rounding drift.

The ledger keeps the calls in flight and the recent ones (the watchdog prints them when a
rank hangs) and per-step totals by group (``comm_bytes_dp``, ``comm_bytes_tp``,
``comm_bytes_pp`` in every metrics record).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

__all__ = ["Ledger", "LedgerEntry", "model_bytes"]

_STEP_GROUPS = ("dp", "tp", "pp")

_Exact = int | Fraction


def _plain(value: _Exact) -> int | float:
    if isinstance(value, int):
        return value
    return int(value) if value.denominator == 1 else float(value)


def _ratio(numerator: int, denominator: int) -> _Exact:
    """numerator / denominator, exactly; a plain int (fast) when it divides."""
    return numerator // denominator if numerator % denominator == 0 else Fraction(numerator, denominator)


def exact_bytes(op: str, n: int, nbytes: int, rank: int, root: int) -> _Exact:
    """Bytes group rank ``rank`` sends for ``op`` on ``nbytes`` over ``n`` ranks (table above), exactly."""
    if n <= 1:
        return 0
    s = nbytes
    if op == "all_reduce":
        return _ratio(2 * (n - 1) * s, n)
    if op in ("reduce_scatter", "all_gather", "all_to_all"):
        return _ratio((n - 1) * s, n)
    if op == "broadcast":
        return 0 if (rank - root) % n == n - 1 else s
    if op == "reduce":  # (n-1)/n * S, plus S/n off the destination: S in all
        return _ratio((n - 1) * s, n) if rank == root else s
    if op == "scatter":
        return _ratio((n - 1) * s, n) if rank == root else 0
    if op == "gather":
        return 0 if rank == root else _ratio(s, n)
    if op == "send":
        return s
    if op in ("recv", "barrier"):
        return 0
    raise ValueError(f"no byte model for op {op!r}")


def model_bytes(op: str, n: int, nbytes: int, rank: int = 0, root: int = 0) -> int | float:
    """Bytes group rank ``rank`` sends for ``op`` on ``n`` ranks with an ``nbytes`` message.

    ``root`` is the src of broadcast/scatter and the dst of reduce/gather. See the table in
    the module docstring; an ``int`` when whole, else a ``float``.
    """
    return _plain(exact_bytes(op, n, nbytes, rank, root))


# ----------------------------------------------------------------------------- ledger


@dataclass
class LedgerEntry:
    """One collective or transfer as this rank saw it. ``finished`` is None while pending."""

    seq: int
    op: str
    group: str
    ranks: tuple[int, ...]
    numel: int
    dtype: str
    bytes_sent: int | float
    tag: str = ""
    started: float = 0.0
    finished: float | None = None
    note: str = ""

    def label(self) -> str:
        return f"{self.op} #{self.seq} on {self.group} group {list(self.ranks)}"


class Ledger:
    """This process's record of communication: pending calls, recent history, byte totals.

    Memory stays bounded: the last ``history`` entries are kept, older ones live on only
    in the running totals. Thread-safe, so a watchdog thread may read it at any time; the
    readers return copies.
    """

    def __init__(self, rank: int, history: int = 1000) -> None:
        self.rank = rank
        self._lock = threading.Lock()
        self._seq = 0
        self._pending: dict[int, LedgerEntry] = {}
        self._recent: deque[LedgerEntry] = deque(maxlen=history)
        self._last: LedgerEntry | None = None
        self._exact: dict[int, _Exact] = {}  # seq -> exact bytes of a pending entry
        self._totals: dict[str, _Exact] = {}
        self._step: dict[str, _Exact] = {}

    def begin(
        self,
        op: str,
        group: str,
        ranks: Sequence[int],
        numel: int,
        dtype: str,
        bytes_sent: int | float | Fraction,
        tag: str = "",
        note: str = "",
    ) -> LedgerEntry:
        """Record the start of a call and return its (live) entry; pass it to :meth:`end`."""
        exact = bytes_sent if isinstance(bytes_sent, (int, Fraction)) else Fraction(bytes_sent)
        with self._lock:
            self._seq += 1
            entry = LedgerEntry(
                self._seq, op, group, tuple(ranks), numel, dtype, _plain(exact), tag, time.monotonic(), None, note
            )
            self._pending[entry.seq] = entry
            self._exact[entry.seq] = exact
            self._recent.append(entry)
            return entry

    def end(self, entry: LedgerEntry) -> None:
        """Mark ``entry`` complete and add its bytes to the totals (idempotent)."""
        with self._lock:
            if entry.seq not in self._exact:  # ended already
                return
            if entry.finished is None:  # not settled before
                entry.finished = time.monotonic()
            self._pending.pop(entry.seq, None)
            exact = self._exact.pop(entry.seq)
            self._totals[entry.group] = self._totals.get(entry.group, 0) + exact
            self._step[entry.group] = self._step.get(entry.group, 0) + exact
            self._last = entry

    def settle(self, entry: LedgerEntry) -> None:
        """The call completed (the backend said so, maybe on its own thread): it is no longer
        pending, so a watchdog does not take it for stuck; its bytes join the totals at
        :meth:`end`, where its caller takes them, so a step's totals do not depend on when
        the backend finished."""
        with self._lock:
            if entry.seq in self._pending:
                entry.finished = time.monotonic()
                del self._pending[entry.seq]

    def pending(self) -> list[LedgerEntry]:
        """Calls begun and not yet complete, oldest first (copies)."""
        with self._lock:
            return [replace(e) for e in sorted(self._pending.values(), key=lambda e: e.seq)]

    def last_completed(self) -> LedgerEntry | None:
        with self._lock:
            return replace(self._last) if self._last is not None else None

    def recent(self, n: int) -> list[LedgerEntry]:
        """The last ``n`` calls begun (pending ones included), oldest first (copies)."""
        with self._lock:
            items = list(self._recent)[-n:] if n > 0 else []
            return [replace(e) for e in items]

    def totals(self) -> dict[str, int | float]:
        """Bytes sent by this rank since the ledger was made, by group name."""
        with self._lock:
            return {g: _plain(v) for g, v in self._totals.items()}

    def take_step_totals(self) -> dict[str, int | float]:
        """``{"comm_bytes_<group>": bytes}`` since the previous call, then reset.

        Always holds ``comm_bytes_dp``, ``_tp`` and ``_pp`` (zero when idle) and every other
        group this ledger has seen, so metric records keep the same keys step to step.
        """
        with self._lock:
            groups = list(_STEP_GROUPS) + [g for g in self._totals if g not in _STEP_GROUPS]
            out = {f"comm_bytes_{g}": _plain(self._step.get(g, 0)) for g in groups}
            self._step = {}
            return out

    def describe(self) -> str:
        """One line: what this rank waits in and what it completed last.

        e.g. ``rank 3: waiting in all_reduce #57 on dp group [1, 3] for 12.0 s; last
        completed: reduce_scatter #56 on dp group [1, 3]``.
        """
        now = time.monotonic()
        with self._lock:
            waiting = sorted(self._pending.values(), key=lambda e: e.seq)
            last = self._last
            if waiting:
                first = waiting[0]
                head = f"waiting in {first.label()} for {now - first.started:.1f} s"
                if len(waiting) > 1:
                    head += f" ({len(waiting) - 1} more pending)"
            else:
                head = "not in a collective"
            tail = last.label() if last is not None else "none"
            return f"rank {self.rank}: {head}; last completed: {tail}"


# ----------------------------------------------------------------------------- handles
