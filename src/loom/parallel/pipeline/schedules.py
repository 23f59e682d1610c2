"""Pipeline schedules as data: for every pp rank, the ordered list of what it does.

Layout: pp ranks 0..p-1, each holding vp model chunks. Chunk c of rank r is virtual stage
``s = c * p + r`` (Megatron's interleaving), stages 0..p*vp-1 in model order, so a
micro-batch visits every rank vp times. With vp == 1, stage == rank.

A schedule is ``list[list[Action]]``, index = pp rank. Compute actions: ``F`` (forward;
on the last stage it includes the loss), ``B`` (full backward), or the split backward
``I`` (gradient w.r.t. the stage input) then ``W`` (gradient w.r.t. the weights).
Transfers are explicit actions next to the compute that needs them:

- F of stage s > 0 is preceded by ``RECV_ACT`` from stage s-1's rank; F of stage s < S-1
  is followed by ``SEND_ACT`` to stage s+1's rank;
- B/I of stage s < S-1 is preceded by ``RECV_GRAD`` from stage s+1's rank; B/I of stage
  s > 0 is followed by ``SEND_GRAD`` to stage s-1's rank.

A RECV names the receiving chunk, a SEND the sending chunk; ``peer`` is the other pp rank.
Transfers happen only between different ranks (vp > 1 needs p >= 2), and for each ordered
pair of ranks and each family (activations, gradients) the sends are posted in the order
the peer receives them, so per-pair FIFO transport suffices. Executed with non-blocking
sends and blocking receives, none of these schedules can deadlock:
:func:`loom.parallel.pipeline.check.check_schedule` proves it for given sizes by simulation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from loom.errors import LoomError

FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD = "F", "B", "I", "W"
SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD"
COMPUTE = (FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD)
SENDS = (SEND_ACT, SEND_GRAD)
RECVS = (RECV_ACT, RECV_GRAD)
KINDS = COMPUTE + SENDS + RECVS


@dataclass(frozen=True)
class Action:
    kind: str  # one of KINDS
    microbatch: int  # 0-based
    chunk: int = 0  # virtual chunk on this rank (0..vp-1)
    peer: int | None = None  # pp rank of the other side, for SEND_*/RECV_* only

    def __str__(self) -> str:
        peer = "" if self.peer is None else f", peer {self.peer}"
        return f"{self.kind}(mb {self.microbatch}, chunk {self.chunk}{peer})"


Schedule = list[list[Action]]


def stage_of(rank: int, chunk: int, p: int) -> int:
    """Virtual stage held as ``chunk`` by pp ``rank``: ``chunk * p + rank``."""
    return chunk * p + rank


def place_of(stage: int, p: int) -> tuple[int, int]:
    """``(rank, chunk)`` holding virtual ``stage``."""
    return stage % p, stage // p


def family(kind: str) -> str:
    """``"act"`` or ``"grad"``: the channel a transfer travels on."""
    return "act" if kind in (SEND_ACT, RECV_ACT) else "grad"


# ---------------------------------------------------------------------------- schedules


def gpipe(p: int, m: int) -> Schedule:
    """GPipe: every rank runs all m forwards, then all m backwards in *forward* micro-batch
    order (0, 1, ..., m-1), the oldest activations freed first, as in
    ``torch.distributed.pipelining.ScheduleGPipe``.

    Uniform costs: bubble (p-1)/m; every rank holds all m micro-batches' activations.
    """
    _check_sizes(p, m, 1)
    order = [Action(FORWARD, i) for i in range(m)] + [Action(BACKWARD, i) for i in range(m)]
    return _with_transfers([list(order) for _ in range(p)], p, 1)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-Flush): rank r runs ``min(p - r - 1, m)`` warm-up forwards, then
    alternates one forward with one backward, then drains the remaining backwards.

    Uniform costs: bubble (p-1)/m like GPipe, but rank r holds at most ``min(p - r, m)``
    micro-batches' activations instead of m.
    """
    _check_sizes(p, m, 1)
    orders = []
    for r in range(p):
        warm = min(p - r - 1, m)
        order = [Action(FORWARD, i) for i in range(warm)]
        for j in range(m - warm):
            order += [Action(FORWARD, warm + j), Action(BACKWARD, j)]
        order += [Action(BACKWARD, j) for j in range(m - warm, m)]
        orders.append(order)
    return _with_transfers(orders, p, 1)


def interleaved_1f1b(p: int, m: int, vp: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM 2): each rank holds vp chunks and works in groups of
    p micro-batches: forwards of micro-batches g*p..g*p+p-1 on chunk 0, then the same
    micro-batches on chunk 1, ..., chunk vp-1; backwards likewise with chunks in reverse.
    Rank r runs ``min(2 (p - r - 1) + (vp - 1) p, m vp)`` warm-up forwards, then one
    forward / one backward, then the remaining backwards. m must be a multiple of p.

    Uniform per-chunk costs: bubble (p-1)/(vp m); rank r holds at most warm-up + 1 chunk
    activations (each 1/vp of a stage). With vp == 1 this is :func:`one_f_one_b`.
    """
    _check_sizes(p, m, vp, interleaved=True)
    if vp == 1:
        return one_f_one_b(p, m)
    total = m * vp

    def nth(k: int, backward: bool) -> tuple[int, int]:
        group, within = divmod(k, p * vp)
        chunk = within // p
        return group * p + within % p, (vp - 1 - chunk) if backward else chunk

    orders = []
    for r in range(p):
        warm = min(2 * (p - r - 1) + (vp - 1) * p, total)
        fwd = [Action(FORWARD, *nth(k, False)) for k in range(total)]
        bwd = [Action(BACKWARD, *nth(k, True)) for k in range(total)]
        order = fwd[:warm]
        for k in range(total - warm):
            order += [fwd[warm + k], bwd[k]]
        order += bwd[total - warm :]
        orders.append(order)
    return _with_transfers(orders, p, vp)


def zero_bubble(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with the backward
    split into I (input gradient, on the critical path: it is what the previous stage
    waits for) and W (weight gradient, needed only by the optimizer step).

    Rank r runs 1F1B's ``min(p - r - 1, m)`` warm-up forwards, then F, I pairs; from its
    (r+1)-th I on, every I is followed by the W of the oldest micro-batch whose W is
    pending, so rank r keeps r W's deferred; those r W's run last, in the time 1F1B
    spends waiting for gradients in the cool-down. Activations are held from F until W,
    so rank r holds at most ``min(p, m)`` micro-batches: 1F1B's peak (rank 0's), reached
    on every rank. Uniform costs with m >= p and W no longer than F or I: bubble
    (p-1)(F + B - 2W) / (m (F + B)) with B = I + W, a third of 1F1B's when F = I = W.
    """
    _check_sizes(p, m, 1)
    return _with_transfers([_zero_bubble_rank(p, m, r) for r in range(p)], p, 1)


def _zero_bubble_rank(p: int, m: int, r: int) -> list[Action]:
    warm = min(p - r - 1, m)
    order = [Action(FORWARD, i) for i in range(warm)]
    pending: deque[int] = deque()
    for j in range(m):  # the j-th backward of this rank is micro-batch j's
        if j + warm < m:
            order.append(Action(FORWARD, j + warm))
        order.append(Action(INPUT_GRAD, j))
        pending.append(j)
        if j >= r:
            order.append(Action(WEIGHT_GRAD, pending.popleft()))
    return order + [Action(WEIGHT_GRAD, j) for j in pending]


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zero_bubble": zero_bubble,
}


def build_schedule(name: str, p: int, m: int, vp: int = 1) -> Schedule:
    """The action lists of schedule ``name`` (a key of :data:`SCHEDULES`) for p ranks,
    m micro-batches and vp chunks per rank (vp > 1 only for ``interleaved_1f1b``)."""
    if name not in SCHEDULES:
        raise LoomError(f"unknown pipeline schedule {name!r}.", f"use one of: {', '.join(SCHEDULES)}.")
    if name == "interleaved_1f1b":
        return interleaved_1f1b(p, m, vp)
    _check_sizes(p, m, vp)
    if vp != 1:
        raise LoomError(
            f"vp = {vp} virtual chunks per rank, but schedule {name!r} runs one chunk per rank.",
            "set vp to 1, or use the interleaved_1f1b schedule for virtual stages.",
        )
    return SCHEDULES[name](p, m)


def _check_sizes(p: int, m: int, vp: int, interleaved: bool = False) -> None:
    for label, value in (("pp", p), ("micro-batch count", m), ("vp", vp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LoomError(
                f"pipeline {label} = {value!r} must be a whole number of at least 1.", f"pass a {label} of 1 or more."
            )
    if interleaved and vp > 1:
        if p < 2:
            raise LoomError(
                f"interleaved_1f1b with vp = {vp} needs pp >= 2; with pp = 1 there is no pipeline to interleave.",
                "set vp to 1, or pp to 2 or more.",
            )
        if m % p:
            raise LoomError(
                f"interleaved_1f1b needs a micro-batch count that is a multiple of pp = {p}; got {m}.",
                f"use a micro-batch count that is a multiple of pp, e.g. {-(-m // p) * p}.",
            )


def _with_transfers(orders: list[list[Action]], p: int, vp: int) -> Schedule:
    """Each rank's compute order with the receives it needs placed right before each
    compute and its sends right after (sends are non-blocking, so posting them at once
    delays nobody; receiving as late as possible blocks least)."""
    last = p * vp - 1
    schedule = []
    for r, order in enumerate(orders):
        actions: list[Action] = []
        for a in order:
            s = stage_of(r, a.chunk, p)
            if a.kind == FORWARD:
                if s > 0:
                    actions.append(Action(RECV_ACT, a.microbatch, a.chunk, peer=(s - 1) % p))
                actions.append(a)
                if s < last:
                    actions.append(Action(SEND_ACT, a.microbatch, a.chunk, peer=(s + 1) % p))
            elif a.kind in (BACKWARD, INPUT_GRAD):
                if s < last:
                    actions.append(Action(RECV_GRAD, a.microbatch, a.chunk, peer=(s + 1) % p))
                actions.append(a)
                if s > 0:
                    actions.append(Action(SEND_GRAD, a.microbatch, a.chunk, peer=(s - 1) % p))
            else:
                actions.append(a)
        schedule.append(actions)
    return schedule
