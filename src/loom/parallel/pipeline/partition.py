"""Which layers each pipeline rank builds.

With pp ranks and vp virtual chunks per rank there are S = pp * vp virtual stages in
model order; chunk c of rank r is stage s = c * pp + r (Megatron's interleaving), so a
micro-batch visits every rank vp times. Layers are cut into S contiguous blocks: equal
counts by default, or balanced by a per-layer cost (the cut minimising the most
expensive stage). The embedding lives on stage 0, the final norm, head and loss on
stage S - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.errors import LoomError


@dataclass(frozen=True)
class StagePlan:
    stage: int  # virtual stage index, 0..S-1
    layers: range
    embed: bool
    head: bool


def split_layers(n_layers: int, stages: int, costs: list[float] | None = None) -> list[range]:
    """Contiguous layer ranges, one per virtual stage."""
    if costs is None:
        if n_layers % stages:
            raise LoomError(
                f"model.n_layers = {n_layers} cannot be split evenly into parallel.pp x parallel.vp = {stages} stages.",
                f"use a layer count that is a multiple of {stages}, or change parallel.pp / parallel.vp.",
            )
        per = n_layers // stages
        return [range(s * per, (s + 1) * per) for s in range(stages)]
    if len(costs) != n_layers:
        raise LoomError(
            f"parallel.layer_costs has {len(costs)} entries for {n_layers} layers.",
            "give one cost per layer (e.g. all 1.0 with heavier first/last stages).",
        )
    if stages > n_layers:
        raise LoomError(f"{stages} pipeline stages for {n_layers} layers.", "use at most one stage per layer.")
    return _balanced(costs, stages)


def _balanced(costs: list[float], stages: int) -> list[range]:
    """Minimise the largest stage cost over contiguous cuts (dynamic programming, O(S n^2))."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for end in range(s, n + 1):
            for start in range(s - 1, end):
                value = max(best[s - 1][start], prefix[end] - prefix[start])
                if value < best[s][end]:
                    best[s][end], cut[s][end] = value, start
    bounds, end = [], n
    for s in range(stages, 0, -1):
        start = cut[s][end]
        bounds.append(range(start, end))
        end = start
    return bounds[::-1]


def rank_stages(n_layers: int, pp: int, vp: int, pp_rank: int, costs: list[float] | None = None) -> list[StagePlan]:
    """The virtual stages (one per chunk, in chunk order) that pipeline rank ``pp_rank`` builds."""
    stages = pp * vp
    ranges = split_layers(n_layers, stages, costs)
    plans = []
    for chunk in range(vp):
        s = chunk * pp + pp_rank
        plans.append(StagePlan(stage=s, layers=ranges[s], embed=s == 0, head=s == stages - 1))
    return plans
