"""Whether a schedule (``schedules.py``'s data) is one the runtime can execute: a pure check.

:func:`check_schedule` raises ``ValueError`` naming the first problem: an action out of
range, a missing or repeated action, a transfer to the wrong rank, sends out of the order
their peer receives them, or a deadlock (found by simulating the lists, ``simulate.py``).
"""

from __future__ import annotations

from collections import defaultdict

from loom.parallel.pipeline.schedules import (
    BACKWARD,
    COMPUTE,
    FORWARD,
    INPUT_GRAD,
    KINDS,
    RECV_ACT,
    RECV_GRAD,
    RECVS,
    SEND_ACT,
    SEND_GRAD,
    SENDS,
    WEIGHT_GRAD,
    Action,
    Schedule,
    family,
    place_of,
    stage_of,
)
from loom.parallel.pipeline.simulate import simulate


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
