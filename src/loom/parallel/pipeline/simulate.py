"""Time a pipeline schedule: when each action runs, the bubble, the activations held.

Execution semantics are the runtime's: every rank runs its action list in order. F, B, I
and W take their cost from :class:`Costs`. A SEND is posted at the sender's current time
and costs the sender nothing (non-blocking). A RECV blocks: it completes at
``max(receiver's time, matching send's post time + transfer)``. A rank whose next action
is a RECV that no rank will ever send is deadlocked, and :func:`simulate` says so.

The same :class:`Timeline` is built from a real run's measured spans by
:func:`from_measurements`, so prediction and measurement are drawn and summarised alike.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from loom.errors import LoomError
from loom.parallel.pipeline.schedules import (
    BACKWARD,
    COMPUTE,
    FORWARD,
    INPUT_GRAD,
    RECVS,
    SEND_ACT,
    SENDS,
    WEIGHT_GRAD,
    Action,
    Schedule,
    family,
    place_of,
    stage_of,
)

TIMELINE_FILE = "pipeline_timeline.json"


@dataclass(frozen=True)
class Costs:
    """Time of one action on one virtual-stage chunk (any unit: seconds, or forward = 1).

    ``backward`` is the full backward B; a split backward runs I for ``backward - weight``
    and W for ``weight`` (``weight=None``: half the backward). ``transfer`` is the time from
    a send's post to the data being there. With vp chunks per rank, costs are *per chunk*:
    a chunk holds 1/vp of the layers a vp = 1 stage holds, so to compare interleaved with
    1F1B on the same model pass the 1F1B costs divided by vp.
    """

    forward: float = 1.0
    backward: float = 2.0
    weight: float | None = None
    transfer: float = 0.0

    def __post_init__(self) -> None:
        for name in ("forward", "backward", "transfer"):
            if not getattr(self, name) >= 0:  # also rejects NaN
                raise LoomError(
                    f"pipeline {name} cost {getattr(self, name)!r} is negative or not a number.",
                    f"pass a {name} cost of 0 or more.",
                )
        if self.weight is not None and not 0 <= self.weight <= self.backward:
            raise LoomError(
                f"weight-gradient cost {self.weight!r} is outside 0..backward cost {self.backward!r}.",
                "the weight gradient is part of the backward: pass a weight cost between 0 and the backward cost.",
            )

    @property
    def weight_grad(self) -> float:
        return self.backward / 2 if self.weight is None else self.weight

    def of(self, kind: str) -> float:
        """Duration of a compute action of ``kind`` (F, B, I or W)."""
        return {
            FORWARD: self.forward,
            BACKWARD: self.backward,
            INPUT_GRAD: self.backward - self.weight_grad,
            WEIGHT_GRAD: self.weight_grad,
        }[kind]


class Span(NamedTuple):
    """One compute action of one rank and when it ran."""

    action: Action
    start: float
    end: float


@dataclass
class Timeline:
    """Per rank, its compute spans in execution order; time 0 is the step's start.

    ``bubble_fraction = (makespan - busy) / busy`` with ``busy`` the busiest rank's compute
    time, i.e. the time lost against a pipeline with no idle slot; uniform costs make all
    ranks equally busy, so it is then every rank's idle / busy ratio.
    """

    ranks: list[list[Span]]
    makespan: float
    measured: bool = False

    @property
    def pp(self) -> int:
        return len(self.ranks)

    @property
    def vp(self) -> int:
        return 1 + max((s.action.chunk for spans in self.ranks for s in spans), default=0)

    @property
    def microbatches(self) -> int:
        return 1 + max((s.action.microbatch for spans in self.ranks for s in spans), default=-1)

    @property
    def busy(self) -> list[float]:
        return [sum(s.end - s.start for s in spans) for spans in self.ranks]

    @property
    def idle(self) -> list[float]:
        return [self.makespan - b for b in self.busy]

    @property
    def bubble_fraction(self) -> float:
        busiest = max(self.busy, default=0.0)
        return (self.makespan - busiest) / busiest if busiest > 0 else 0.0

    @property
    def peak_inflight(self) -> list[int]:
        """Per rank, the most (micro-batch, chunk) forward activations held at once: from
        the end of F until its B ends, or for a split backward until its W ends."""
        peaks = []
        for spans in self.ranks:
            held: set[tuple[int, int]] = set()
            peak = 0
            for span in sorted(spans, key=lambda s: (s.start, s.end)):
                key = (span.action.microbatch, span.action.chunk)
                if span.action.kind == FORWARD:
                    held.add(key)
                    peak = max(peak, len(held))
                elif span.action.kind in (BACKWARD, WEIGHT_GRAD):
                    held.discard(key)
            peaks.append(peak)
        return peaks

    def summary(self) -> dict:
        """The numbers, JSON-ready."""
        return {
            "pp": self.pp,
            "vp": self.vp,
            "microbatches": self.microbatches,
            "makespan": self.makespan,
            "bubble_fraction": self.bubble_fraction,
            "peak_inflight": self.peak_inflight,
            "busy": self.busy,
            "idle": self.idle,
        }


def simulate(schedule: Schedule, costs: Costs | None = None) -> Timeline:
    """Run ``schedule`` under the execution semantics above with ``costs``.

    Raises ``ValueError`` if a receive gets a message meant for another micro-batch or
    chunk, a send has no receive, or the ranks deadlock (naming what each one waits for).
    """
    costs = costs or Costs()
    p = len(schedule)
    n_stages = p * (1 + max((a.chunk for actions in schedule for a in actions), default=0))
    clock = [0.0] * p
    pos = [0] * p
    spans: list[list[Span]] = [[] for _ in range(p)]
    channels: dict[tuple[int, int, str], deque] = defaultdict(deque)  # (src, dst, family) -> messages
    progress = True
    while progress:  # timing depends only on each rank's own order, so sweep until stuck
        progress = False
        for r, actions in enumerate(schedule):
            while pos[r] < len(actions):
                a = actions[pos[r]]
                if a.kind in COMPUTE:
                    end = clock[r] + costs.of(a.kind)
                    spans[r].append(Span(a, clock[r], end))
                    clock[r] = end
                elif a.kind in SENDS:
                    target = stage_of(r, a.chunk, p) + (1 if a.kind == SEND_ACT else -1)
                    dst, chunk = place_of(target, p)
                    if not 0 <= target < n_stages or dst != a.peer:
                        raise ValueError(f"rank {r}, action {pos[r]} {a}: stage {target} is not on rank {a.peer}")
                    channels[(r, dst, family(a.kind))].append((a.microbatch, chunk, clock[r]))
                elif a.kind in RECVS:
                    queue = channels[(a.peer, r, family(a.kind))]
                    if not queue:
                        break
                    mb, chunk, posted = queue.popleft()
                    if (mb, chunk) != (a.microbatch, a.chunk):
                        raise ValueError(
                            f"rank {r}, action {pos[r]} {a}: the next {family(a.kind)} message from "
                            f"rank {a.peer} is micro-batch {mb} for chunk {chunk} (sends out of order)"
                        )
                    clock[r] = max(clock[r], posted + costs.transfer)
                else:
                    raise ValueError(f"rank {r}, action {pos[r]}: unknown kind {a.kind!r}")
                pos[r] += 1
                progress = True
    stuck = [f"rank {r} waits at action {pos[r]} {schedule[r][pos[r]]}" for r in range(p) if pos[r] < len(schedule[r])]
    if stuck:
        raise ValueError("deadlock: " + "; ".join(stuck))
    for (src, dst, fam), queue in channels.items():
        if queue:
            mb, chunk, _ = queue[0]
            raise ValueError(
                f"rank {src} sends {fam} of micro-batch {mb} for chunk {chunk} to rank {dst}, which never receives it"
            )
    return Timeline(spans, max(clock, default=0.0))


def bubble_formula(name: str, p: int, m: int, vp: int = 1, costs: Costs | None = None) -> tuple[str, float] | None:
    """The textbook bubble fraction of schedule ``name`` (uniform per-stage costs, zero
    transfer time), as ``(formula, value)``; None where no closed form holds."""
    costs = costs or Costs()
    if name in ("gpipe", "1f1b") or (name == "interleaved_1f1b" and vp == 1):
        return "(p-1)/m", (p - 1) / m
    if name == "interleaved_1f1b":
        return "(p-1)/(vp*m)", (p - 1) / (vp * m)
    if name == "zero_bubble":
        f, b, w = costs.forward, costs.backward, costs.weight_grad
        if m >= p and w <= f and w <= b - w and f + b > 0:  # W no longer than F and I
            return "(p-1)(F+B-2W)/(m(F+B))", (p - 1) * (f + b - 2 * w) / (m * (f + b))
    return None


# ---------------------------------------------------------------------------- measured runs


def from_measurements(ranks: Sequence[Sequence[Mapping]]) -> Timeline:
    """A :class:`Timeline` from a real run's records.

    ``ranks[r]`` is pp rank r's list of records ``{"kind": "F"|"B"|"I"|"W",
    "microbatch": int, "chunk": int, "start": float, "end": float}`` (chunk may be left out
    for 0; records of other kinds, such as transfers, are skipped). ``start``/``end`` are
    seconds on one clock shared by all ranks (e.g. ``time.time()``) or already relative to
    a common origin; the earliest start becomes time 0. Raises ``ValueError`` on a bad record.
    """
    spans: list[list[Span]] = []
    for r, records in enumerate(ranks):
        row = []
        for n, rec in enumerate(records):
            try:
                kind = rec["kind"]
                if kind not in COMPUTE:
                    continue
                action = Action(kind, int(rec["microbatch"]), int(rec.get("chunk", 0)))
                start, end = float(rec["start"]), float(rec["end"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"rank {r}, record {n}: {err!r} in {rec!r}") from err
            if not end >= start:
                raise ValueError(f"rank {r}, record {n}: end {end} before start {start}")
            row.append(Span(action, start, end))
        spans.append(sorted(row, key=lambda s: (s.start, s.end)))
    origin = min((s.start for row in spans for s in row), default=0.0)
    spans = [[Span(s.action, s.start - origin, s.end - origin) for s in row] for row in spans]
    return Timeline(spans, max((s.end for row in spans for s in row), default=0.0), measured=True)


def load_measured(run_dir: Path) -> Timeline:
    """The measured timeline of a finished run: ``RUN_DIR/pipeline_timeline.json``, holding
    ``{"ranks": [[record, ...], ...]}`` with records as in :func:`from_measurements`."""
    path = Path(run_dir) / TIMELINE_FILE
    fix = (
        f"pass the folder of a pipeline-parallel run (pp > 1); it writes {TIMELINE_FILE} as "
        '{"ranks": [[{"kind", "microbatch", "chunk", "start", "end"}, ...], ...]}.'
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoomError(f"{path} does not exist.", fix) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoomError(f"{path} cannot be read as JSON: {err}.", fix) from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("ranks"), list)
        or not all(isinstance(row, list) for row in data["ranks"])
    ):
        raise LoomError(f"{path} has no 'ranks' list of per-rank record lists.", fix)
    try:
        timeline = from_measurements(data["ranks"])
    except ValueError as err:
        raise LoomError(f"{path}: {err}.", fix) from None
    if not any(timeline.ranks):
        raise LoomError(f"{path} holds no F/B/I/W records.", fix)
    return timeline
