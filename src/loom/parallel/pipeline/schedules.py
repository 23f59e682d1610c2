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
sends and blocking receives, none of these schedules can deadlock: :func:`check_schedule`
proves it for given sizes by simulation.
"""

from __future__ import annotations

from collections import defaultdict, deque
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


# ---------------------------------------------------------------------------- checking


def check_schedule(schedule: Schedule, p: int, m: int, vp: int = 1) -> None:
    """Raise ``ValueError`` naming the first problem, or return if the schedule is valid:

    - one list per rank; kinds, micro-batches, chunks and peers in range; a transfer's
      peer is the rank of the neighbouring stage and never the rank itself;
    - every (micro-batch, stage) has exactly one F and one backward (B, or I and W);
      a backward follows its forward, W follows its I;
    - each F of stage s > 0 is preceded by its RECV_ACT, each B/I of stage s < S-1 by its
      RECV_GRAD; each F of s < S-1 is followed by its SEND_ACT, each B/I of s > 0 by its
      SEND_GRAD; no other transfers;
    - per ordered rank pair and family the sends come in the order the peer receives;
    - executed with non-blocking sends and blocking receives it does not deadlock
      (simulated with default costs: whether it deadlocks does not depend on them).
    """
    if len(schedule) != p:
        raise ValueError(f"schedule has {len(schedule)} rank lists for pp = {p}")
    last = p * vp - 1
    for r, actions in enumerate(schedule):
        seen: dict[tuple[str, int, int], int] = {}
        for idx, a in enumerate(actions):
            where = f"rank {r}, action {idx} {a}"
            _check_action(a, where, r, p, m, vp)
            key = (a.kind, a.microbatch, a.chunk)
            if key in seen:
                raise ValueError(f"{where}: appears twice (also action {seen[key]})")
            s = stage_of(r, a.chunk, p)
            needs = _prerequisites(a.kind, a.microbatch, a.chunk, s, last)
            if a.kind in SENDS or a.kind in RECVS:
                if a.kind in (SEND_ACT, RECV_GRAD) and s == last:
                    raise ValueError(f"{where}: the last stage has no next stage to exchange with")
                if a.kind in (RECV_ACT, SEND_GRAD) and s == 0:
                    raise ValueError(f"{where}: stage 0 has no previous stage to exchange with")
            for options, why in needs:
                if not any(o in seen for o in options):
                    raise ValueError(f"{where}: {why}")
            seen[key] = idx
        _check_complete(seen, r, p, m, vp)
    _check_channels(schedule, p)
    from loom.parallel.pipeline.simulate import simulate

    simulate(schedule)  # raises ValueError naming what each rank waits for on deadlock


def _check_action(a: Action, where: str, r: int, p: int, m: int, vp: int) -> None:
    if a.kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {a.kind!r} (expected one of {', '.join(KINDS)})")
    if not 0 <= a.microbatch < m:
        raise ValueError(f"{where}: micro-batch out of range 0..{m - 1}")
    if not 0 <= a.chunk < vp:
        raise ValueError(f"{where}: chunk out of range 0..{vp - 1}")
    if a.kind in COMPUTE:
        if a.peer is not None:
            raise ValueError(f"{where}: compute actions take no peer")
        return
    if a.peer == r:
        raise ValueError(f"{where}: rank {r} would wait on itself")
    s = stage_of(r, a.chunk, p)
    other = s + 1 if a.kind in (SEND_ACT, RECV_GRAD) else s - 1
    if a.peer != other % p:
        raise ValueError(f"{where}: peer should be rank {other % p} (stage {s} exchanges with stage {other})")


def _prerequisites(kind: str, i: int, c: int, s: int, last: int) -> list[tuple[tuple, str]]:
    """What must come earlier on the same rank: (any of these keys, why) pairs."""
    f, recv_act, recv_grad = (FORWARD, i, c), (RECV_ACT, i, c), (RECV_GRAD, i, c)
    if kind == FORWARD:
        return [((recv_act,), "forward before its activation is received")] if s > 0 else []
    if kind in (BACKWARD, INPUT_GRAD):
        needs = [((f,), "backward before its forward")]
        if s < last:
            needs.append(((recv_grad,), "backward before its output gradient is received"))
        return needs
    if kind == WEIGHT_GRAD:
        return [((f,), "weight gradient before its forward"), (((INPUT_GRAD, i, c),), "W before its I")]
    if kind == SEND_ACT:
        return [((f,), "activation sent before its forward")]
    if kind == SEND_GRAD:
        return [(((BACKWARD, i, c), (INPUT_GRAD, i, c)), "input gradient sent before its backward")]
    return []


def _check_complete(seen: dict, r: int, p: int, m: int, vp: int) -> None:
    last = p * vp - 1
    for c in range(vp):
        s = stage_of(r, c, p)
        for i in range(m):
            what = f"rank {r}: micro-batch {i} on chunk {c} (stage {s})"
            has = {kind for kind in KINDS if (kind, i, c) in seen}
            if FORWARD not in has:
                raise ValueError(f"{what} has no forward")
            split = INPUT_GRAD in has or WEIGHT_GRAD in has
            if BACKWARD in has and split:
                raise ValueError(f"{what} has both B and I/W")
            if BACKWARD not in has and not {INPUT_GRAD, WEIGHT_GRAD} <= has:
                raise ValueError(f"{what} has no complete backward (B, or I and W)")
            for kind, needed in ((RECV_ACT, s > 0), (SEND_ACT, s < last), (RECV_GRAD, s < last), (SEND_GRAD, s > 0)):
                if needed and kind not in has:
                    raise ValueError(f"{what} has no {kind}")


def _check_channels(schedule: Schedule, p: int) -> None:
    """Per (sender, receiver, family), the i-th send must carry what the i-th receive expects."""
    sends: dict[tuple[int, int, str], list] = defaultdict(list)
    recvs: dict[tuple[int, int, str], list] = defaultdict(list)
    for r, actions in enumerate(schedule):
        for idx, a in enumerate(actions):
            if a.kind in SENDS:
                step = 1 if a.kind == SEND_ACT else -1
                dst, chunk = place_of(stage_of(r, a.chunk, p) + step, p)
                sends[(r, dst, family(a.kind))].append(((a.microbatch, chunk), idx))
            elif a.kind in RECVS:
                recvs[(a.peer, r, family(a.kind))].append(((a.microbatch, a.chunk), idx))
    for key in sorted(set(sends) | set(recvs)):
        src, dst, fam = key
        out, into = sends.get(key, []), recvs.get(key, [])
        for n, (sent, got) in enumerate(zip(out, into)):
            if sent[0] != got[0]:
                raise ValueError(
                    f"{fam} channel rank {src} -> rank {dst}: send #{n} (rank {src}, action {sent[1]}) carries "
                    f"micro-batch {sent[0][0]} for chunk {sent[0][1]}, but receive #{n} (rank {dst}, action "
                    f"{got[1]}) expects micro-batch {got[0][0]} for chunk {got[0][1]}: sends out of order"
                )
        if len(out) != len(into):
            raise ValueError(f"{fam} channel rank {src} -> rank {dst}: {len(out)} sends but {len(into)} receives")
