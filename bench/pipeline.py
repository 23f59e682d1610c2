"""loom's pipeline schedules against ``torch.distributed.pipelining`` on the same multi-rank job.

For each schedule and pipeline size pp, both sides run the same model on the same
micro-batches:

- model: ``Transformer`` from one config and seed, cut into the same layer ranges per
  virtual stage (``rank_stages``: stage s = chunk * pp + rank, embedding on stage 0, final
  norm, head and loss on the last). loom builds one ``Transformer`` per rank holding all its
  chunks' layers, as the trainer does; torch gets one ``nn.Module`` per stage, each a
  ``Transformer(..., layers=<the stage's range>, embed=..., head=...)`` whose forward is
  ``run_stage``, wrapped in a ``PipelineStage``. Layout-independent init makes the weights
  identical on both sides.
- batch: the global batch of a step is ``batch_offsets``/``get_batch`` of (seed, step) with
  ``micro_batch x microbatches`` rows; micro-batch k is rows ``batch_rows(micro, m, 0, k)``
  on both sides (torch's ``TensorChunkSpec(0)`` split of the whole batch gives the same rows).
- loss: the mean token cross-entropy (``loss_from_logits``, fp32) of each micro-batch,
  averaged over micro-batches (loom divides each loss by m; torch's ``scale_grads`` divides
  the accumulated gradients by m).
- step: the schedule, then the tied-embedding gradient sum between the first and last
  rank (the same helper on both sides; gpt2 ties the head to the embedding), then AdamW
  (``build_adamw``, fused on CPU; lr from ``lr_at``) and zero grads. No clipping on either
  side.

Schedule pairs (loom / torch): ``gpipe`` / ``ScheduleGPipe``; ``1f1b`` / ``Schedule1F1B``;
``interleaved_1f1b`` (vp chunks per rank) / ``ScheduleInterleaved1F1B`` (vp stages per
rank); ``zero_bubble`` (ZB-H1) / ``ScheduleInterleavedZeroBubble`` with one stage per rank
(torch's ZB1P: with one local stage, rank r runs p-r-1 warm-up forwards and defers r
weight-gradient steps, which is ZB-H1). torch's ``ScheduleZBVZeroBubble`` and
``ScheduleDualPipeV`` need two stages per rank in a V layout that loom has no schedule for,
so they are not paired. The compute orders are the same on both sides: for the
interleaved and zero-bubble schedules the script checks loom's action list against the
``pipeline_order`` torch executes (column "compute order = torch's"); ``ScheduleGPipe`` and
``Schedule1F1B`` run hand-coded loops (all forwards then all backwards in micro-batch order;
min(m, p - r) warm-up forwards, then backward/forward pairs, then the remaining backwards),
which are loom's ``gpipe`` and ``one_f_one_b`` orders.

Timing. Ranks start once per pp (``run_ranks``, gloo, one thread per rank). Each round builds
every side afresh and runs their steps interleaved: step k of every schedule, loom and torch
back to back (which goes first alternates step by step and round by round), each step after
a barrier of all ranks, so every rank starts it together. A step's time is the slowest rank's
wall time of the whole step; a side's tokens/s is the global batch's tokens over its median
step time after ``--warmup`` steps (torch infers shapes and warms up its p2p in its first
step); the table gives the median over rounds and the ratio of the medians.

Bubble. loom's runtime times every compute action (``StepTiming``); a rank's measured
bubble is ``(wall - busy) / busy`` of ``runtime.step``, median over timed steps. The
simulator gets loom's mean measured F, B, I, W durations over all ranks and timed steps
(``Costs(forward=F, backward=B or I+W, weight=W)``, zero transfer time) and the same
``build_schedule`` lists; its per-rank bubble is (rank's last compute end - busy) / busy,
the same quantity. It sees uniform costs per stage, so the first stage's embedding and the
last stage's head and loss (and everything that is not F/B/I/W: transfers, waits, Python
between actions) show up as the difference.

Memory. One extra, untimed step per side at the end of the last round runs under
``torch.autograd.graph.saved_tensors_hooks`` that count the bytes autograd saves for
backward, once per storage and without parameters, and track when each is released: the
peak per rank is the most activation bytes held at once. Tensors alive outside autograd
(stage outputs waiting to be sent, received buffers not yet used) are not counted. The
simulator's peak number of micro-batches in flight per rank stands next to it.

    python bench/pipeline.py --out bench/results/pipeline.md
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    ONE_ROUND,
    add_model_args,
    bench_command,
    busy_warning,
    check_rounds,
    checkout,
    closing_lines,
    head_lines,
    job_config,
    job_overrides,
    machine,
    noise_head,
    sizes,
    write_result,
)
from torch import nn
from torch.distributed import pipelining

from loom.config import Config
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.errors import LoomError
from loom.model.transformer import Transformer
from loom.optim.adamw import build_adamw
from loom.optim.lr import lr_at
from loom.parallel.pipeline.partition import StagePlan, rank_stages
from loom.parallel.pipeline.rank import add_from_peer
from loom.parallel.pipeline.runtime import PipelineRuntime
from loom.parallel.pipeline.schedules import build_schedule, stage_of
from loom.parallel.pipeline.simulate import Costs, bubble_formula, from_measurements, simulate
from loom.train.batches import batch_offsets, batch_rows, get_batch
from loom.train.data import prepare_dataset
from loom.train.trainer import TRAIN_STREAM

GOAL = 1.0  # loom / torch tokens/s at or above this, for every schedule
AGREE_TOL = 1e-5  # |loss_loom - loss_torch| at step 0 for "agree"
NOISY_SPREAD = 0.05  # per-round ratios further apart than this: the machine was busy
SIDES = ("loom", "torch")
KINDS = ("F", "B", "I", "W")
# loom schedule -> torch.distributed.pipelining class name (one stage per rank unless interleaved)
TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
}


# ----------------------------------------------------------------------------- memory


class _Held:
    """A tensor autograd saved; its release (the graph dropping it) is counted."""

    __slots__ = ("tensor", "owner", "ptr")

    def __init__(self, tensor: torch.Tensor, owner: SavedBytes, ptr: int) -> None:
        self.tensor, self.owner, self.ptr = tensor, owner, ptr

    def __del__(self) -> None:
        self.owner.release(self.ptr)


class SavedBytes:
    """Live and peak bytes of the storages autograd holds for backward (parameters excluded).

    Use as ``with torch.autograd.graph.saved_tensors_hooks(sb.pack, sb.unpack):``; a storage
    saved by several nodes (or as several views) counts once, until its last holder is freed.
    """

    def __init__(self, params) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list[int]] = {}  # storage ptr -> [holders, nbytes]
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.skip or nbytes == 0:
            return t
        ref = self.refs.setdefault(ptr, [0, nbytes])
        if ref[0] == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        ref[0] += 1
        return _Held(t, self, ptr)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, ptr: int) -> None:
        ref = self.refs[ptr]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self.refs[ptr]


# ----------------------------------------------------------------------------- one rank


@dataclass
class Run:
    """One side's per-step record for one round, as one rank saw it."""

    step_s: list[float]
    pipe_s: list[float]  # the schedule alone (loom: runtime.step; torch: schedule.step)
    losses: list[float]  # last rank only: the step's mean loss over micro-batches
    bubble: list[float]  # loom only: StepTiming.bubble per step
    records: list[list[dict]]  # loom only: StepTiming.records per step

    @classmethod
    def empty(cls) -> Run:
        return cls([], [], [], [], [])


class Side:
    """One implementation's stages, optimizer and step for one schedule on this rank."""

    name = ""

    def __init__(self, config: Config, ctx, schedule: str, vp: int) -> None:
        self.config = config
        self.schedule = schedule
        self.pp = ctx.comm("pp")
        self.rank = ctx.coords.pp
        self.device = ctx.device
        self.plans = rank_stages(config.model.n_layers, self.pp.size, vp, self.rank)
        self.first = any(p.embed for p in self.plans)
        self.last = any(p.head for p in self.plans)
        self.m = config.train.microbatches
        self.run = Run.empty()

    def modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def pipeline(
        self, x: torch.Tensor, y: torch.Tensor, micro: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> float | None:
        raise NotImplementedError

    def tied_weight(self) -> nn.Parameter | None:
        """The tied embedding's copy on the first or last rank (None elsewhere or untied)."""
        if not self.config.model.tied or self.first == self.last:
            return None
        for module in self.modules():
            model = module.model if isinstance(module, StageModule) else module
            if model.tok_emb is not None:
                return model.tok_emb.weight
        return None

    def sync_tied(self) -> None:
        """Sum the tied embedding's gradient over its copies on the first and last rank (as the trainer)."""
        weight = self.tied_weight()
        if weight is None:
            return
        add_from_peer(self.pp, weight.grad, self.pp.size - 1 if self.first else 0)

    def step(self, step: int, x, y, micro, world) -> None:
        train = self.config.train
        lr = lr_at(step, train.lr, train.warmup_steps, train.steps, train.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        world.barrier()
        t0 = time.perf_counter()
        loss = self.pipeline(x, y, micro)
        t1 = time.perf_counter()
        self.sync_tied()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        self.run.step_s.append(t2 - t0)
        self.run.pipe_s.append(t1 - t0)
        if loss is not None:
            self.run.losses.append(loss)

    def saved_peak(self, x, y, micro, world) -> int:
        """Peak activation bytes saved for backward during one untimed step (then discarded)."""
        counter = SavedBytes(p for mod in self.modules() for p in mod.parameters())
        world.barrier()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            self.pipeline(x, y, micro)
        self.optimizer.zero_grad(set_to_none=True)
        return counter.peak


class LoomSide(Side):
    """loom's PipelineRuntime, driven as the trainer drives it."""

    name = "loom"

    def __init__(self, config: Config, ctx, schedule: str, vp: int) -> None:
        super().__init__(config, ctx, schedule, vp)
        train = config.train
        self.model = Transformer(
            config.model,
            seed=train.seed,
            device=self.device,
            layers=sorted(i for plan in self.plans for i in plan.layers),
            embed=self.first,
            head=self.last,
        )
        self.actions = build_schedule(schedule, self.pp.size, self.m, vp)[self.rank]
        self.runtime = PipelineRuntime(
            self.model,
            self.plans,
            self.pp,
            (train.micro_batch, train.seq_len, config.model.d_model),
            torch.float32,
            self.device,
        )
        self.optimizer = build_adamw(self.model, train, self.device)
        self.last_timing = None

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def pipeline(self, x, y, micro) -> float | None:
        total, self.last_timing = self.runtime.step(self.actions, micro)
        return total.item() if self.last else None

    def step(self, step: int, x, y, micro, world) -> None:
        super().step(step, x, y, micro, world)
        self.run.bubble.append(self.last_timing.bubble)
        self.run.records.append(self.last_timing.records)


class StageModule(nn.Module):
    """One virtual stage for torch: a ``Transformer`` holding only the stage's layers."""

    def __init__(self, config: Config, plan: StagePlan, device: torch.device) -> None:
        super().__init__()
        self.plan = plan
        self.model = Transformer(
            config.model,
            seed=config.train.seed,
            device=device,
            layers=list(plan.layers),
            embed=plan.embed,
            head=plan.head,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.run_stage(x, self.plan.layers, self.plan.embed, self.plan.head)


class TorchSide(Side):
    """``torch.distributed.pipelining``: a PipelineStage per virtual stage and the paired schedule class."""

    name = "torch"

    def __init__(self, config: Config, ctx, schedule: str, vp: int) -> None:
        super().__init__(config, ctx, schedule, vp)
        self.stage_modules = [StageModule(config, plan, self.device) for plan in self.plans]
        stages = [
            pipelining.PipelineStage(mod, plan.stage, self.pp.size * vp, self.device, group=self.pp.group)
            for mod, plan in zip(self.stage_modules, self.plans)
        ]
        # every rank passes the loss (torch runs the backward only when it has one); only the last stage calls it
        loss_fn = self.stage_modules[-1].model.loss_from_logits
        cls = getattr(pipelining, TORCH_SCHEDULES[schedule])
        single = cls in (pipelining.ScheduleGPipe, pipelining.Schedule1F1B)
        self.torch_schedule = cls(stages[0] if single else stages, self.m, loss_fn=loss_fn)
        # the runtime schedules execute their pipeline_order; GPipe and 1F1B run a hand-coded loop and their
        # pipeline_order is only a description (torch 2.13's 1F1B one misnumbers the last rank's micro-batches)
        order = {} if single else self.torch_schedule.pipeline_order
        self.compute_order = [
            (a.stage_index, a.computation_type.value, a.microbatch_index)
            for a in order.get(self.rank, [])
            if a is not None and a.computation_type.value in KINDS
        ]
        self.optimizer = build_adamw(nn.ModuleList(self.stage_modules), config.train, self.device)

    def modules(self) -> list[nn.Module]:
        return list(self.stage_modules)

    def pipeline(self, x, y, micro) -> float | None:
        args = (x,) if self.first else ()
        if self.last:
            losses: list[torch.Tensor] = []
            self.torch_schedule.step(*args, target=y, losses=losses, return_outputs=False)
            return torch.stack(losses).mean().item()
        self.torch_schedule.step(*args, return_outputs=False)
        return None


def rank_main(overrides: list[str], schedules: list[str], vp: int, repeats: int) -> dict:
    """Per rank: every step's global batch; per round fresh sides for every schedule, steps interleaved."""
    config, tokenizer = job_config(overrides)
    ctx = init_distributed(config.parallel)
    data = prepare_dataset(config.data, tokenizer)  # the parent tokenised it: a cache hit
    train, m = config.train, config.train.microbatches
    steps = []
    for step in range(train.steps):
        offsets = batch_offsets(len(data.train), train.seq_len, train.micro_batch * m, train.seed, step, TRAIN_STREAM)
        x, y = get_batch(data.train, train.seq_len, offsets, ctx.device)
        micro = [
            (x[batch_rows(train.micro_batch, m, 0, k)], y[batch_rows(train.micro_batch, m, 0, k)]) for k in range(m)
        ]
        steps.append((x, y, micro))
    world = ctx.comm("world")
    rounds = []
    peaks: dict[str, dict[str, int]] = {}
    for r in range(repeats):
        sides = {
            s: (
                LoomSide(config, ctx, s, vp if s == "interleaved_1f1b" else 1),
                TorchSide(config, ctx, s, vp if s == "interleaved_1f1b" else 1),
            )
            for s in schedules
        }
        gc.collect()
        for step, (x, y, micro) in enumerate(steps):
            for name in schedules:
                pair = sides[name] if (r + step) % 2 == 0 else sides[name][::-1]
                for side in pair:
                    side.step(step, x, y, micro, world)
        if r == repeats - 1:
            x, y, micro = steps[-1]
            for name in schedules:
                peaks[name] = {side.name: side.saved_peak(x, y, micro, world) for side in sides[name]}
        world.barrier()
        rounds.append({name: {side.name: side.run for side in pair} for name, pair in sides.items()})
    same_order = {}
    for name, (loom_side, torch_side) in sides.items():
        mine = [
            (stage_of(ctx.coords.pp, a.chunk, ctx.dims.pp), a.kind, a.microbatch)
            for a in loom_side.actions
            if a.kind in KINDS
        ]
        same_order[name] = None if not torch_side.compute_order else mine == torch_side.compute_order
    return {"rank": ctx.coords.pp, "rounds": rounds, "peaks": peaks, "same_order": same_order}


# ----------------------------------------------------------------------------- results


@dataclass
class ScheduleResult:
    """One (pp, schedule): per-round medians of both sides, bubbles, costs, memory, losses."""

    pp: int
    schedule: str
    vp: int
    microbatches: int
    tokens_per_step: int
    step_s: dict[str, list[float]]  # side -> per-round median step seconds (slowest rank per step)
    pipe_s: dict[str, list[float]]  # side -> per-round median schedule-only seconds (slowest rank)
    bubble: list[float]  # per rank: median over rounds and timed steps of loom's StepTiming.bubble
    costs: dict[str, float]  # loom's mean F/B/I/W seconds over all ranks and timed steps
    sim_costs: Costs  # what the simulator got: those means
    sim_bubble: list[float]  # per rank: simulated (last compute end - busy) / busy
    sim_fraction: float  # simulated (makespan - busiest) / busiest
    sim_peak: list[int]  # per rank: simulated peak micro-batches (x chunks) in flight
    timeline_bubble: float  # measured (makespan - busiest) / busiest from all ranks' records, median
    peak_bytes: dict[str, list[int]]  # side -> per rank peak saved-for-backward bytes
    loss0_diff: float
    loss_max_diff: float
    rank_costs: list[dict[str, float]]  # per rank: loom's mean F/B/I/W seconds
    same_order: bool | None  # loom's compute order == torch's pipeline_order on every rank (None: torch has none)

    def tps(self, side: str) -> list[float]:
        return [self.tokens_per_step / s for s in self.step_s[side]]

    def median_tps(self, side: str) -> float:
        return statistics.median(self.tps(side))

    @property
    def ratio(self) -> float:
        return self.median_tps("loom") / self.median_tps("torch")

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.tps("loom"), self.tps("torch"))]


def collect(pp: int, schedule: str, vp: int, results: list[dict], args: argparse.Namespace) -> ScheduleResult:
    by_rank = sorted(results, key=lambda res: res["rank"])
    w = args.warmup
    n_rounds = len(by_rank[0]["rounds"])

    def slowest(side: str, field: str, rnd: int) -> float:
        per_rank = [getattr(res["rounds"][rnd][schedule][side], field)[w:] for res in by_rank]
        return statistics.median(max(vals) for vals in zip(*per_rank))

    step_s = {s: [slowest(s, "step_s", rnd) for rnd in range(n_rounds)] for s in SIDES}
    pipe_s = {s: [slowest(s, "pipe_s", rnd) for rnd in range(n_rounds)] for s in SIDES}
    loom_runs = [[res["rounds"][rnd][schedule]["loom"] for rnd in range(n_rounds)] for res in by_rank]
    bubble = [statistics.median(b for run in runs for b in run.bubble[w:]) for runs in loom_runs]
    durations: list[dict[str, list[float]]] = [{k: [] for k in KINDS} for _ in by_rank]
    timeline = []
    for rnd in range(n_rounds):
        for step in range(w, len(loom_runs[0][rnd].records)):
            per_rank = [runs[rnd].records[step] for runs in loom_runs]
            timeline.append(from_measurements(per_rank).bubble_fraction)
            for rank, recs in enumerate(per_rank):
                for rec in recs:
                    durations[rank][rec["kind"]].append(rec["end"] - rec["start"])
    costs = {k: statistics.fmean(v) for k in KINDS if (v := [d for ds in durations for d in ds[k]])}
    rank_costs = [{k: statistics.fmean(v) for k, v in ds.items() if v} for ds in durations]
    orders = [res["same_order"][schedule] for res in by_rank]
    split = "I" in costs
    sim_costs = Costs(
        forward=costs["F"],
        backward=costs["I"] + costs["W"] if split else costs["B"],
        weight=costs["W"] if split else None,
    )
    sim = simulate(build_schedule(schedule, pp, args.microbatches, vp), sim_costs)
    sim_bubble = []
    for spans, busy in zip(sim.ranks, sim.busy):
        sim_bubble.append((max(s.end for s in spans) - busy) / busy if busy else 0.0)
    last = by_rank[-1]["rounds"]
    pairs = [(a, b) for rd in last for a, b in zip(rd[schedule]["loom"].losses, rd[schedule]["torch"].losses)]
    loss0 = max(abs(rd[schedule]["loom"].losses[0] - rd[schedule]["torch"].losses[0]) for rd in last)
    return ScheduleResult(
        pp,
        schedule,
        vp,
        args.microbatches,
        args.micro_batch * args.microbatches * args.seq_len,
        step_s,
        pipe_s,
        bubble,
        costs,
        sim_costs,
        sim_bubble,
        sim.bubble_fraction,
        sim.peak_inflight,
        statistics.median(timeline),
        {s: [res["peaks"][schedule][s] for res in by_rank] for s in SIDES},
        loss0,
        max(abs(a - b) for a, b in pairs),
        rank_costs,
        None if None in orders else all(orders),
    )


def bench_pp(pp: int, overrides: list[str], args: argparse.Namespace) -> tuple[list[ScheduleResult], float]:
    began = time.perf_counter()
    sides = 2 * len(args.schedule_list)
    # a generous bound: startup, then every step of every side and round at a pessimistic 2 s per rank pair
    timeout = 180 + 2.0 * sides * args.repeats * (args.steps + 1) * max(1, pp // 2)
    results = run_ranks(rank_main, pp, args=(overrides, args.schedule_list, args.vp, args.repeats), timeout_s=timeout)
    wall = time.perf_counter() - began
    out = [collect(pp, s, args.vp if s == "interleaved_1f1b" else 1, results, args) for s in args.schedule_list]
    return out, wall


# ----------------------------------------------------------------------------- report


def source() -> str:
    """Which loom was measured: the checkout's commit and its uncommitted changes under src/ (read-only git)."""
    commit, changed, where = checkout()
    dirty = f"; uncommitted changes in {', '.join(changed)}" if changed else "; src/ as committed"
    return f"loom at commit {commit}{dirty}{where}"


def _pp(r: ScheduleResult) -> str:
    return f"{r.pp}{' (oversubscribed)' if r.pp > (os.cpu_count() or 1) else ''}"


def _name(r: ScheduleResult) -> str:
    vp = f" (vp {r.vp})" if r.vp > 1 else ""
    return f"{r.schedule}{vp} / {TORCH_SCHEDULES[r.schedule]}"


def _mib(values: list[int]) -> str:
    return " / ".join(f"{v / 2**20:.2f}" for v in values)


def _agree(diff: float) -> str:
    return f"{diff:.1e} ({'agree' if diff < AGREE_TOL else 'DIFFER'})"


def table_lines(results: list[ScheduleResult]) -> list[str]:
    lines = [
        "| pp | schedule (loom / torch) | loom tokens/s | torch tokens/s | ratio (loom / torch) | "
        "loom bubble measured: rank 0 / max | simulated: rank 0 / max | simulated peak in flight per rank | "
        "loom saved-for-backward peak MiB per rank | torch saved-for-backward peak MiB per rank | "
        "loss step 0 abs diff | compute order = torch's |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | --- |",
    ]
    for r in results:
        lines.append(
            f"| {_pp(r)} | {_name(r)} | {r.median_tps('loom'):,.0f} | {r.median_tps('torch'):,.0f} | {r.ratio:.3f} | "
            f"{r.bubble[0]:.3f} / {max(r.bubble):.3f} | {r.sim_bubble[0]:.3f} / {max(r.sim_bubble):.3f} | "
            f"{' / '.join(map(str, r.sim_peak))} | {_mib(r.peak_bytes['loom'])} | {_mib(r.peak_bytes['torch'])} | "
            f"{_agree(r.loss0_diff)} | {_order(r.same_order)} |"
        )
    return lines


def _order(same: bool | None) -> str:
    return "same loop (see notes)" if same is None else ("yes" if same else "NO")


def rank_lines(results: list[ScheduleResult]) -> list[str]:
    lines = [
        "| pp | schedule | rank | loom mean F / B / I / W ms | loom bubble measured | simulated | "
        "simulated peak in flight | loom saved MiB | torch saved MiB |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for rank, costs in enumerate(r.rank_costs):
            ms = " / ".join(f"{costs[k] * 1e3:.2f}" if k in costs else "-" for k in KINDS)
            lines.append(
                f"| {r.pp} | {r.schedule} | {rank} | {ms} | {r.bubble[rank]:.3f} | {r.sim_bubble[rank]:.3f} | "
                f"{r.sim_peak[rank]} | {r.peak_bytes['loom'][rank] / 2**20:.2f} | "
                f"{r.peak_bytes['torch'][rank] / 2**20:.2f} |"
            )
    return lines


def detail_lines(results: list[ScheduleResult]) -> list[str]:
    lines = [
        "| pp | schedule | round | loom tokens/s | torch tokens/s | ratio | schedule-only ms loom / torch | "
        "loom mean F / B / I / W ms (all ranks: the simulator's costs) | textbook bubble at those costs | "
        "(makespan - busiest) / busiest, measured timeline vs simulated | loss max abs diff, all steps |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: |",
    ]
    for r in results:
        costs = " / ".join(f"{r.costs[k] * 1e3:.2f}" if k in r.costs else "-" for k in KINDS)
        formula = bubble_formula(r.schedule, r.pp, r.microbatches, r.vp, r.sim_costs)
        textbook = f"{formula[0]} = {formula[1]:.3f}" if formula else "-"
        for i, (lt, tt, lp, tp) in enumerate(
            zip(r.tps("loom"), r.tps("torch"), r.pipe_s["loom"], r.pipe_s["torch"]), 1
        ):
            lines.append(
                f"| {r.pp} | {r.schedule} | {i} | {lt:,.0f} | {tt:,.0f} | {lt / tt:.3f} | "
                f"{lp * 1e3:.1f} / {tp * 1e3:.1f} | {costs} | {textbook} | "
                f"{r.timeline_bubble:.3f} vs {r.sim_fraction:.3f} | {r.loss_max_diff:.1e} |"
            )
    return lines


TIMING = (
    "ranks start once per pp; each round builds every side afresh and runs step k of every schedule, loom and "
    "torch back to back (alternating which goes first), each step after a barrier of all ranks; a step's time "
    "is the slowest rank's wall time of the whole step (schedule, tied-embedding gradient sum, AdamW, zero "
    "grads); tokens/s = global tokens per step / median step time after the warm-up steps, median over rounds. "
    "Schedule-only ms: loom's runtime.step / torch's schedule.step alone (slowest rank, median)."
)
BUBBLE = (
    "Bubble: loom's StepTiming per rank, (wall - busy) / busy of runtime.step, median over timed steps; "
    "simulated: simulate(build_schedule(...), Costs(F, B or I+W, W)) with loom's mean measured per-action "
    "durations (all ranks, timed steps; zero transfer time), per rank (its last compute end - busy) / busy. "
    "Peak in flight: the simulator's most (micro-batch, chunk) activations a rank holds at once."
)
MEMORY = (
    "Memory: bytes autograd saves for backward, counted per storage without parameters via "
    "torch.autograd.graph.saved_tensors_hooks over one extra untimed step, and released when the graph drops "
    "them; the peak per rank is the most held at once (tensors alive outside autograd, such as outputs "
    "waiting to be sent, are not counted)."
)


def interpretation(results: list[ScheduleResult], cores: int) -> list[str]:
    out = []
    over = sorted({r.pp for r in results if r.pp > cores})
    if over:
        out.append(
            f"Oversubscription: pp = {', '.join(map(str, over))} puts that many ranks x 1 thread on {cores} cores, "
            "so ranks time-share the cores with each other and with gloo's threads: a rank waiting for a transfer "
            "may wait for a peer that is not scheduled, and idle time in one rank is compute time for another. "
            "Those rows compare loom and torch under the same contention; their bubbles and absolute tokens/s say "
            "nothing about a pipeline with a core per stage."
        )
    missed = [r for r in results if r.ratio < GOAL]
    out.append(
        f"Goal (loom at least {GOAL:.1f}x torch for every schedule): "
        + (
            "met for every row."
            if not missed
            else "missed for " + ", ".join(f"{r.schedule} at pp {r.pp} ({r.ratio:.3f})" for r in missed) + "."
        )
    )
    for r in results:
        if "W" not in r.costs or r.pp < 2:
            continue
        later = r.rank_costs[1:]  # rank 0 holds stage 0: no input gradient, so its I is empty and W is all of B
        i_ms, w_ms = (statistics.fmean(c[k] for c in later) * 1e3 for k in ("I", "W"))
        ref = next((q for q in results if q.pp == r.pp and q.schedule == "1f1b"), None)
        b_ms = statistics.fmean(c["B"] for c in ref.rank_costs[1:]) * 1e3 if ref else None
        against = (
            f", against a full backward B of {b_ms:.2f} ms on the same ranks under 1f1b: W = {w_ms / b_ms:.2f} x B, "
            f"I + W = {(i_ms + w_ms) / b_ms:.2f} x B"
            if b_ms
            else ""
        )
        out.append(
            f"{r.schedule} at pp {r.pp}, {'rank 1' if r.pp == 2 else f'ranks 1..{r.pp - 1}'}: loom's I takes {i_ms:.2f} ms and W {w_ms:.2f} ms"
            f"{against}. loom's I is the backward without the linears' dW (their weights enter autograd detached); "
            "W is those dW = dY^T X matmuls from the recorded X and the dY captured in I, then one autograd pass "
            "that accumulates every gradient of the micro-batch (weight_grad.py). torch's stage_backward_weight "
            "runs one autograd pass per parameter group from the gradients captured at the parameter-adjacent "
            "nodes during I, on the graph I retained."
        )
    return out


def markdown(
    command: str, when: str, job: str, results: list[ScheduleResult], noise: str, notes: list[str], smoke: bool
) -> str:
    lines = ["# Pipeline: loom schedules vs torch.distributed.pipelining", ""]
    if smoke:
        lines += [
            "**SMOKE RUN on a busy machine** (few steps, one round, other jobs running): it shows that the "
            "script works end to end; its timings are not a result. Rerun with the full defaults on a quiet "
            "machine.",
            "",
        ]
    lines += [
        *head_lines(command, when, machine()),
        f"Source: {source()}",
        "",
        f"Job: {job}",
        "",
        *table_lines(results),
        "",
        "Per round and per-action detail:",
        "",
        *detail_lines(results),
        "",
        "Per rank (loom's measured costs and bubble, medians over timed steps; memory from the extra step):",
        "",
        *rank_lines(results),
        "",
        *closing_lines(TIMING, noise, notes, BUBBLE, MEMORY),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def build_overrides(args: argparse.Namespace, pp: int) -> list[str]:
    return job_overrides(args, f"train.microbatches={args.microbatches}", f"parallel.pp={pp}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_args(p, layers=8, layers_help="; a multiple of pp x vp")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (a multiple of every pp)")
    p.add_argument("--vp", type=int, default=2, help="chunks per rank for interleaved_1f1b")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=3, help="rounds per pp, each with fresh sides")
    p.add_argument("--pp", default="2,4", help="comma-separated pipeline sizes, one run_ranks each")
    p.add_argument("--schedules", default=",".join(TORCH_SCHEDULES), help="comma-separated loom schedule names")
    p.add_argument("--corpus", default="stdlib", help="data.corpus")
    p.add_argument("--smoke", action="store_true", help="mark the result file as a smoke run (timings not a result)")
    p.add_argument("--out", type=Path, help="also write the result as markdown here")
    args = p.parse_args(argv)
    check_rounds(p, args)
    args.pp_sizes = sizes(p, "--pp", args.pp, "size")
    args.schedule_list = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = [s for s in args.schedule_list if s not in TORCH_SCHEDULES]
    if unknown or not args.schedule_list:
        p.error(f"--schedules {args.schedules!r}: use some of {', '.join(TORCH_SCHEDULES)}")
    for pp in args.pp_sizes:
        if args.microbatches < pp or args.microbatches % pp:
            p.error(
                f"--microbatches {args.microbatches} must be a multiple of every pp (torch's 1F1B needs at "
                f"least pp, loom's interleaved a multiple); pp {pp} fails"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = bench_command("pipeline.py")
    try:
        for pp in args.pp_sizes:  # validate every layout before starting any rank
            config, tokenizer = job_config(build_overrides(args, pp))
            config.validate()
            for s in args.schedule_list:
                vp = args.vp if s == "interleaved_1f1b" else 1
                for r in range(pp):
                    rank_stages(config.model.n_layers, pp, vp, r)
                build_schedule(s, pp, args.microbatches, vp)
        prepare_dataset(config.data, tokenizer, log=print)  # tokenise once here; the ranks hit the cache
    except LoomError as exc:
        print(exc, file=sys.stderr)
        return 2
    model = config.model
    params = Transformer(model, seed=config.train.seed).num_params()
    cores = os.cpu_count() or 1
    job = (
        f"{model.preset} ({model.family}, {model.n_layers} layers, d_model {model.d_model}, {model.n_heads} heads, "
        f"vocab {model.vocab_size}, {params / 1e6:.2f}M params, tied embeddings: {model.tied}), "
        f"{args.microbatches} micro-batches of {args.micro_batch} x {args.seq_len} tokens per step "
        f"(global batch {args.microbatches * args.micro_batch} x {args.seq_len}), interleaved vp {args.vp}, "
        f"{args.steps} steps ({args.steps - args.warmup} timed) x {args.repeats} rounds per side, fp32, gloo, "
        "1 thread per rank, no grad clipping"
    )
    print(f"job: {job}")
    print(f"timing: {TIMING}\n")
    load_start = os.getloadavg()[0]
    results: list[ScheduleResult] = []
    for pp in args.pp_sizes:
        rows, wall = bench_pp(pp, build_overrides(args, pp), args)
        results += rows
        for r in rows:
            per_round = ", ".join(f"{q:.3f}" for q in r.ratios)
            print(
                f"pp {pp} {r.schedule}: loom {r.median_tps('loom'):,.0f} tok/s, torch {r.median_tps('torch'):,.0f} "
                f"tok/s, ratio {r.ratio:.3f} (rounds {per_round}); bubble loom r0 {r.bubble[0]:.3f} max "
                f"{max(r.bubble):.3f}, simulated r0 {r.sim_bubble[0]:.3f} max {max(r.sim_bubble):.3f}; "
                f"loss step 0 diff {r.loss0_diff:.1e}"
            )
        print(f"pp {pp}: {wall:.0f} s wall\n")

    ratios = [q for r in results for q in r.ratios]
    noisy = [f"pp {r.pp} {r.schedule}" for r in results if max(r.ratios) - min(r.ratios) > NOISY_SPREAD]
    noise = (
        noise_head(load_start, cores, ratios)
        + (busy_warning(NOISY_SPREAD, ", ".join(noisy)) if noisy else ".")
        + (ONE_ROUND if args.repeats == 1 else "")
    )
    notes = interpretation(results, cores)
    print("\n".join(table_lines(results)))
    print()
    print(noise)
    for line in notes:
        print(line)
    write_result(args.out, lambda when: markdown(command, when, job, results, noise, notes, args.smoke))
    ok = all(r.loss0_diff < AGREE_TOL and r.same_order is not False for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
