"""loom's bucketed DDP against torch's DistributedDataParallel on the same multi-rank job.

Both sides train the same model (``Transformer`` from one config and seed on every rank,
so the weights start identical), on the same global batch (``batch_offsets`` of the step,
rank r taking rows ``batch_rows(micro, 1, r, 0)``, as the trainer does), with the same
optimizer (``build_adamw``: torch's AdamW, fused on CPU), the same lr schedule
(``lr_at``), the same gradient clipping and the same bucket size (torch's
``bucket_cap_mb`` = loom's ``ddp.bucket_mb``; with an explicit cap torch's first bucket
takes the same cap). Each step does what loom's trainer does with DDP: forward, backward
(bucket all-reduces overlapping it), sync, an all-reduce of the loss for the metrics
(the global batch's mean loss; torch DDP does not average the loss, so the torch side does
it by hand with one ``dist.all_reduce``, where loom's trainer carries it in the last gradient
bucket), ``.item()``, clip (loom: by the norm its sync measured, bucket by bucket as each
all-reduce landed; torch: ``clip_grad_norm_``), optimizer step, zero grads.
The torch side keeps torch's defaults otherwise (``gradient_as_bucket_view=False`` and
``zero_grad(set_to_none=True)``; ``--torch-grad-view`` switches to bucket views as loom
keeps them); buffers are not broadcast each forward (the model has none, and loom does not
sync them either).

loom runs twice: as the trainer runs it (``ddp.transport = auto``: on one host the buckets
travel through shared memory, ``loom.distributed.shm``), and "loom over gloo" (``ddp.transport =
backend``: the same gloo group torch's side uses, so the two DDP implementations meet on
equal transport). A fourth side, "no sync", runs the same step with no communication at
all (each rank trains on its own rows, its loss not averaged): the floor under all, so
``DDP cost`` = a side's step time minus the no-sync step time is what each implementation
adds per step (exposed communication plus its own bookkeeping).

Timing. Ranks start once per world size (``run_ranks``, gloo, one thread per rank). Each
round builds all sides afresh and runs their steps interleaved: step k of every side back
to back, the order rotating step by step (and round by round), so a burst of load from
elsewhere on the machine hits all alike. A side's step time is rank 0's wall time of a
whole step (the all-reduces couple the ranks every step); its tokens/s is the global tokens
per step over its median step time after ``--warmup`` steps (torch rebuilds its buckets in
gradient-ready order after its first step). The table gives the median over rounds of each
side and the ratio of the medians; the per-round table adds the paired ratio, the median
over steps of torch's / loom's time at the same step.

Bytes. loom's ledger gives the dp bytes each rank sends per step, split into the sync (the
gradient all-reduces, the last of which carries the loss for the metrics) and any separate
loss all-reduce (none when the loss rode along); the sync is checked against
2(n-1)/n x (Psi + 1) x 4 bytes (ring all-reduce, Psi parameters and the loss, fp32).

    python bench/ddp.py --out bench/results/ddp.md
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import (
    StepRecord,
    add_model_args,
    bench_command,
    busy_warning,
    check_rounds,
    checkout,
    closing_lines,
    fmt_bytes,
    fmt_ranks,
    head_lines,
    job_config,
    job_overrides,
    machine,
    noise_head,
    paired_ratio,
    sizes,
    write_result,
)
from torch.nn.parallel import DistributedDataParallel

from loom.config import Config
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.errors import LoomError
from loom.model.transformer import Transformer
from loom.optim.adamw import build_adamw
from loom.optim.lr import lr_at
from loom.parallel.ddp import DataParallel
from loom.train.batches import batch_offsets, batch_rows, get_batch
from loom.train.data import prepare_dataset
from loom.train.trainer import TRAIN_STREAM

GOAL = 1.0  # loom / torch DDP tokens/s at or above this
AGREE_TOL = 1e-5  # max |loss_loom - loss_torch| over all steps for "agree"
NOISY_SPREAD = 0.05  # per-round ratios further apart than this: the machine was busy
PHASES = ("fwd", "bwd", "sync", "loss", "opt")  # sync: loom's finish_gradient_sync (torch: inside bwd)
SIDES = ("loom", "loom_gloo", "torch", "nosync")  # loom_gloo: loom with ddp.transport = backend


@dataclass
class Run(StepRecord):
    """One side's per-step record for one round, as one rank saw it (and what only this bench keeps)."""

    phases: ClassVar[tuple[str, ...]] = PHASES
    grad_bytes: list[int | float] = field(default_factory=list)  # loom only: ledger, gradient all-reduces
    loss_bytes: list[int | float] = field(default_factory=list)  # loom only: ledger, the loss scalar
    buckets: int = 0  # gradient all-reduces per step (torch: after its bucket rebuild; 0 without DDP)
    transport: str = ""  # loom: what carried its buckets (shm or backend)


# ----------------------------------------------------------------------------- one rank


class Side:
    """One implementation's model, optimizer and step; ``step`` records into ``run``."""

    name = ""

    def __init__(self, config: Config, ctx) -> None:
        self.config = config
        self.model = Transformer(config.model, seed=config.train.seed, device=ctx.device)
        self.run = Run()

    def _begin(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        train = self.config.train
        lr = lr_at(step, train.lr, train.warmup_steps, train.steps, train.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

    def bucket_count(self) -> int:
        return 0

    def _clip(self) -> None:
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)


class LoomSide(Side):
    """loom's DataParallel driven as the trainer drives it (fp32, no accumulation).

    ``transport="auto"`` is the trainer's default (shared memory where the ranks share a
    host); ``"backend"`` sends the buckets through the gloo group torch's side uses.
    """

    def __init__(self, config: Config, ctx, bucket_mb: float, transport: str) -> None:
        super().__init__(config, ctx)
        self.name = "loom" if transport == "auto" else "loom_gloo"
        self.ledger = ctx.ledger
        self.comm = ctx.comm("dp")
        # as the trainer builds it for pure dp in fp32: the norm is measured during the sync
        self.ddp = DataParallel(self.model, self.comm, bucket_mb, measure_norm=True, transport=transport)
        self.optimizer = build_adamw(self.model, config.train, ctx.device)

    def close(self) -> None:
        self.ddp.close()

    def bucket_count(self) -> int:
        return len(self.ddp.buckets)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.ledger.take_step_totals()  # only this side sends through the ledger; start each step clean
        c0, t0 = time.process_time(), time.perf_counter()
        self._begin(self.optimizer, step)
        loss = self.model.loss(x, y)
        total = loss.detach().clone()
        carried = self.ddp.carry(total)  # the loss rides in the last gradient bucket, as in the trainer
        t1 = time.perf_counter()
        self.ddp.scale_loss(loss).backward()  # loss / n, as the trainer does: no division pass
        t2 = time.perf_counter()
        self.ddp.finish_gradient_sync()
        t3 = time.perf_counter()
        grad_bytes = self.ledger.take_step_totals()["comm_bytes_dp"]
        if not carried:
            self.comm.all_reduce(total, op="avg", tag="metrics")
        self.run.losses.append(total.item())
        t4 = time.perf_counter()
        clip = self.config.train.grad_clip
        self.ddp.clip_grad_norm(clip if clip > 0 else float("inf"))  # by the norm measured in the sync
        self.optimizer.step()
        self.ddp.zero_grad()
        t5 = time.perf_counter()
        cpu = time.process_time() - c0
        self.run.grad_bytes.append(grad_bytes)
        self.run.loss_bytes.append(self.ledger.take_step_totals()["comm_bytes_dp"])
        self.run.record(cpu, t0, t1, t2, t3, t4, t5)


class TorchSide(Side):
    """torch's DistributedDataParallel; the loss averaged by hand for the metrics, as loom's trainer does."""

    name = "torch"

    def __init__(self, config: Config, ctx, bucket_mb: float, grad_view: bool) -> None:
        super().__init__(config, ctx)
        self.group = ctx.comm("dp").group
        self.world = ctx.comm("dp").size
        self.ddp = DistributedDataParallel(
            self.model,
            process_group=self.group,
            bucket_cap_mb=bucket_mb,
            forward_sync_buffers=False,
            gradient_as_bucket_view=grad_view,
        )
        self.set_to_none = not grad_view  # set_to_none would drop the views gradient_as_bucket_view makes
        self.optimizer = build_adamw(self.model, config.train, ctx.device)

    def bucket_count(self) -> int:
        """Buckets of the last step, from DDP's logging data (a private API: 0 if it ever goes away)."""
        try:
            return int(self.ddp._get_ddp_logging_data()["num_buckets_reduced"])
        except (AttributeError, KeyError, TypeError, ValueError):
            return 0

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        self._begin(self.optimizer, step)
        logits = self.ddp(x)  # through DDP's forward, so its reducer is armed for backward
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))  # = Transformer.loss
        t1 = time.perf_counter()
        loss.backward()  # the bucket all-reduces, the last wait and the copy back to .grad run in here
        t2 = t3 = time.perf_counter()
        total = loss.detach().clone()
        dist.all_reduce(total, group=self.group)
        total.div_(self.world)
        self.run.losses.append(total.item())
        t4 = time.perf_counter()
        self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        t5 = time.perf_counter()
        cpu = time.process_time() - c0
        self.run.record(cpu, t0, t1, t2, t3, t4, t5)


class NoSyncSide(Side):
    """The same step with no communication: each rank trains on its own rows (the floor under both)."""

    name = "nosync"

    def __init__(self, config: Config, ctx) -> None:
        super().__init__(config, ctx)
        self.optimizer = build_adamw(self.model, config.train, ctx.device)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        self._begin(self.optimizer, step)
        loss = self.model.loss(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = t3 = time.perf_counter()
        self.run.losses.append(loss.item())
        t4 = time.perf_counter()
        self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        cpu = time.process_time() - c0
        self.run.record(cpu, t0, t1, t2, t3, t4, t5)


def rank_main(overrides: list[str], bucket_mb: float, repeats: int, torch_grad_view: bool) -> dict:
    """Per rank: its rows of each step's global batch; per round fresh sides, their steps interleaved."""
    config, tokenizer = job_config(overrides)
    ctx = init_distributed(config.parallel)
    data = prepare_dataset(config.data, tokenizer)  # the parent tokenised it: a cache hit
    train, dp, rank = config.train, ctx.dims.dp, ctx.coords.dp
    batches = []
    for step in range(train.steps):
        offsets = batch_offsets(len(data.train), train.seq_len, train.micro_batch * dp, train.seed, step, TRAIN_STREAM)
        rows = offsets[batch_rows(train.micro_batch, 1, rank, 0)]
        batches.append(get_batch(data.train, train.seq_len, rows, ctx.device))
    world = ctx.comm("world")
    rounds = []
    for r in range(repeats):
        sides = [
            LoomSide(config, ctx, bucket_mb, "auto"),
            LoomSide(config, ctx, bucket_mb, "backend"),
            TorchSide(config, ctx, bucket_mb, torch_grad_view),
            NoSyncSide(config, ctx),
        ]
        gc.collect()
        world.barrier()
        for step, (x, y) in enumerate(batches):
            shift = (r + step) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                side.step(step, x, y)
        world.barrier()
        for side in sides:
            side.run.buckets = side.bucket_count()
            if isinstance(side, LoomSide):
                side.run.transport = side.ddp.transport
                side.close()
        rounds.append({side.name: side.run for side in sides})
    params = Transformer(config.model, seed=train.seed).num_params()
    if ctx.is_main:
        return {"rounds": rounds, "params": params}
    # other ranks: only their byte counts, to check that every rank sends the same
    return {"grad_bytes": sorted({b for rd in rounds for b in rd["loom"].grad_bytes}), "params": params}


# ----------------------------------------------------------------------------- report


def source() -> str:
    """Which loom was measured: the checkout's commit and its uncommitted changes under src/ (read-only git)."""
    commit, changed, where = checkout()
    ddp_code = ("src/loom/parallel/ddp.py", "src/loom/distributed/")
    touched = [c for c in changed if c.startswith(ddp_code) or ddp_code[1].startswith(c)]
    if not changed:
        state = "src/ as committed"
    else:
        ddp_state = (
            f"uncommitted changes to the DDP code: {', '.join(touched)}"
            if touched
            else "the DDP code (parallel/ddp.py, dist/) as committed"
        )
        others = ", ".join(c for c in changed if c not in touched) or "none"
        state = f"{ddp_state}; other uncommitted changes under src/: {others}"
    return f"loom at commit {commit}; {state}{where}"


@dataclass
class WorldResult:
    """One world size: per-round medians of each side, losses and bytes."""

    world: int
    tokens_per_step: int
    step_s: dict[str, list[float]]  # side -> per-round median step seconds
    cpu_s: dict[str, list[float]]  # side -> per-round median CPU seconds per step (rank 0, all threads)
    phases: dict[str, list[dict[str, float]]]  # side -> per-round median phase ms
    paired: list[float]  # per round: median over timed steps of torch step time / loom step time
    paired_gloo: list[float]  # the same for loom over gloo
    transport: set  # what carried loom's (auto) buckets
    loss_diff: float
    grad_bytes: set
    loss_bytes: set
    buckets: dict[str, set]  # side -> gradient all-reduces per step seen over the rounds
    formula: Fraction
    wall_s: float

    def tps(self, side: str) -> list[float]:
        return [self.tokens_per_step / s for s in self.step_s[side]]

    def median_tps(self, side: str) -> float:
        return statistics.median(self.tps(side))

    def cost_ms(self, side: str) -> float:
        """Median over rounds of (side's median step - no-sync median step), in ms."""
        return statistics.median(s - n for s, n in zip(self.step_s[side], self.step_s["nosync"])) * 1e3

    def ratio(self, side: str = "loom") -> float:
        return self.median_tps(side) / self.median_tps("torch")

    def ratios(self, side: str = "loom") -> list[float]:
        return [a / b for a, b in zip(self.tps(side), self.tps("torch"))]

    @property
    def bytes_match(self) -> bool:
        return len(self.grad_bytes) == 1 and Fraction(next(iter(self.grad_bytes))) == self.formula


def bench_world(world: int, overrides: list[str], args: argparse.Namespace) -> WorldResult:
    began = time.perf_counter()
    # a generous bound: startup, then every step of every side and round at a pessimistic 2 s per rank pair
    timeout = 120 + 2.0 * len(SIDES) * args.repeats * args.steps * max(1, world // 2)
    results = run_ranks(
        rank_main, world, args=(overrides, args.bucket_mb, args.repeats, args.torch_grad_view), timeout_s=timeout
    )
    wall = time.perf_counter() - began
    rounds, params = results[0]["rounds"], results[0]["params"]
    diff = max(
        abs(a - b)
        for rd in rounds
        for side in ("loom", "loom_gloo")
        for a, b in zip(rd[side].losses, rd["torch"].losses, strict=True)
    )
    grad_bytes = {b for rd in rounds for b in rd["loom"].grad_bytes}
    for other in results[1:]:
        grad_bytes |= set(other["grad_bytes"])
    return WorldResult(
        world,
        args.micro_batch * world * args.seq_len,
        {s: [rd[s].median_step_s(args.warmup) for rd in rounds] for s in SIDES},
        {s: [rd[s].median_cpu_s(args.warmup) for rd in rounds] for s in SIDES},
        {s: [rd[s].median_phase_ms(args.warmup) for rd in rounds] for s in SIDES},
        [paired_ratio(rd["loom"], rd["torch"], args.warmup) for rd in rounds],
        [paired_ratio(rd["loom_gloo"], rd["torch"], args.warmup) for rd in rounds],
        {rd["loom"].transport for rd in rounds},
        diff,
        grad_bytes,
        {b for rd in rounds for b in rd["loom"].loss_bytes},
        {s: {rd[s].buckets for rd in rounds} for s in ("loom", "torch")},
        Fraction(2 * (world - 1), world) * (params + 1) * 4,
        wall,
    )


def table_lines(results: list[WorldResult]) -> list[str]:
    lines = [
        "| ranks | loom tokens/s (transport) | torch DDP tokens/s | ratio (loom / torch) | loom over gloo tokens/s | "
        "ratio (loom over gloo / torch) | no-sync tokens/s | "
        "DDP cost ms/step (loom / loom over gloo / torch) | buckets (loom / torch) | loom dp bytes/step/rank: sync | "
        "2(n-1)/n x (Psi + 1) x 4 | sync = formula | separate loss all-reduce | loss max abs diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in results:
        grads = ", ".join(fmt_bytes(b) for b in sorted(r.grad_bytes))
        loss = ", ".join(fmt_bytes(b) for b in sorted(r.loss_bytes))
        verdict = "agree" if r.loss_diff < AGREE_TOL else "DIFFER"
        lines.append(
            f"| {fmt_ranks(r.world)} | {r.median_tps('loom'):,.0f} ({'/'.join(sorted(r.transport))}) | "
            f"{r.median_tps('torch'):,.0f} | {r.ratio():.3f} | {r.median_tps('loom_gloo'):,.0f} | {r.ratio('loom_gloo'):.3f} | "
            f"{r.median_tps('nosync'):,.0f} | {r.cost_ms('loom'):.1f} / {r.cost_ms('loom_gloo'):.1f} / {r.cost_ms('torch'):.1f} | "
            f"{'/'.join(map(str, sorted(r.buckets['loom'])))} / {'/'.join(map(str, sorted(r.buckets['torch'])))} | {grads} | "
            f"{fmt_bytes(r.formula)} | {'yes' if r.bytes_match else 'NO'} | {loss} | {r.loss_diff:.1e} ({verdict}) |"
        )
    return lines


def round_lines(results: list[WorldResult]) -> list[str]:
    phases = "/".join(PHASES)
    lines = [
        f"| ranks | round | loom tokens/s | torch tokens/s | ratio | paired ratio | loom over gloo: ratio, paired | "
        f"no-sync tokens/s | CPU ms/step loom / loom over gloo / torch / no-sync | loom ms {phases} | torch ms {phases} |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- | --- |",
    ]
    for r in results:
        cpu = zip(*(r.cpu_s[s] for s in SIDES))
        rows = zip(
            r.tps("loom"),
            r.tps("torch"),
            r.tps("nosync"),
            r.paired,
            r.ratios("loom_gloo"),
            r.paired_gloo,
            cpu,
            r.phases["loom"],
            r.phases["torch"],
        )
        for i, (lt, tt, nt, pr, gr, gp, c, lp, tp) in enumerate(rows, 1):
            lines.append(
                f"| {r.world} | {i} | {lt:,.0f} | {tt:,.0f} | {lt / tt:.3f} | {pr:.3f} | {gr:.3f}, {gp:.3f} | {nt:,.0f} | "
                f"{' / '.join(f'{v * 1e3:.1f}' for v in c)} | "
                f"{' / '.join(f'{lp[p]:.1f}' for p in PHASES)} | {' / '.join(f'{tp[p]:.1f}' for p in PHASES)} |"
            )
    return lines


TIMING = (
    "in each round loom (ddp.transport = auto, the trainer's default: shared memory when the ranks share a host), "
    "loom over gloo (ddp.transport = backend: the gloo group torch's side uses), torch and no-sync start from fresh "
    "models and run their steps interleaved, the order rotating step by step; tokens/s = global tokens per step / median of rank 0's whole-step wall time after "
    "the warm-up steps; paired ratio = median over timed steps of torch's step time / loom's at the same step; "
    "DDP cost = median step time minus no-sync's; CPU ms/step = rank 0's process CPU time per step (all its "
    "threads, gloo's included: work done, insensitive to waiting for the cores). A step is lr, forward, backward, gradient sync, loss "
    "all-reduce + item, clip, AdamW step, zero grads (batches are cut before timing). Phase columns are "
    "per-round medians in ms: fwd (forward + loss), bwd (backward; torch's bucket all-reduces, their final "
    "wait and copy-back run inside it), sync (loom's finish_gradient_sync: wait for in-flight buckets, taking each one's norm as it lands; the "
    "loss went through ddp.scale_loss, loss / n, so no bucket divides; torch: 0), loss (.item(); torch's loss "
    "all-reduce, loom's loss rode in its last bucket), opt (clip, AdamW, zero grads)."
)


def interpretation(results: list[WorldResult], cores: int) -> list[str]:
    out = []
    over = [r.world for r in results if r.world > cores]
    if over:
        out.append(
            f"Oversubscription: {', '.join(map(str, over))} ranks x 1 thread on {cores} cores, so ranks time-share "
            "the cores (with each other and with gloo's communication threads), and a rank waiting in an all-reduce "
            "may wait for a peer that is not scheduled. Those rows compare loom and torch under the same "
            "contention; their absolute tokens/s say nothing about scaling."
        )
    for r in results:
        lp = {p: statistics.median(d[p] for d in r.phases["loom"]) for p in PHASES}
        tp = {p: statistics.median(d[p] for d in r.phases["torch"]) for p in PHASES}
        out.append(
            f"{r.world} ranks: loom ({'/'.join(sorted(r.transport))}) runs at {r.ratio():.3f}x torch DDP's tokens/s "
            f"({'meets' if r.ratio() >= GOAL else 'misses'} the {GOAL:.1f} goal; paired per-step ratio "
            f"{statistics.median(r.paired):.3f}, above 1 in {sum(q > 1 for q in r.paired)} of {len(r.paired)} rounds); "
            f"loom over the same gloo group as torch runs at {r.ratio('loom_gloo'):.3f}x (paired "
            f"{statistics.median(r.paired_gloo):.3f}). Over the no-sync step loom adds {r.cost_ms('loom'):.1f} ms, "
            f"loom over gloo {r.cost_ms('loom_gloo'):.1f} ms and torch {r.cost_ms('torch'):.1f} ms; rank 0 CPU per step "
            f"{' / '.join(f'{statistics.median(r.cpu_s[s]) * 1e3:.1f}' for s in SIDES)} ms "
            "(loom / loom over gloo / torch / no-sync). "
            f"Backward + sync {lp['bwd'] + lp['sync']:.1f} ms (loom, "
            f"{lp['sync']:.1f} of it in finish_gradient_sync) vs {tp['bwd']:.1f} ms (torch); loss "
            f"{lp['loss']:.2f} vs {tp['loss']:.2f} ms; clip + AdamW + zero {lp['opt']:.1f} vs {tp['opt']:.1f} ms. "
            f"Sync bytes {'equal' if r.bytes_match else 'DIFFER from'} 2(n-1)/n x (Psi + 1) x 4, in "
            f"{'/'.join(map(str, sorted(r.buckets['loom'])))} all-reduces per step for loom and "
            f"{'/'.join(map(str, sorted(r.buckets['torch'])))} for torch. Signs over the {len(r.paired)} rounds, "
            f"steadier than the medians on a busy machine: loom used more CPU per step than torch in "
            f"{sum(lc > tc for lc, tc in zip(r.cpu_s['loom'], r.cpu_s['torch']))}, and its step was the slower "
            f"of the back-to-back pair (paired ratio below 1) in {sum(q < 1 for q in r.paired)}."
        )
    return out


def markdown(command: str, when: str, job: str, results: list[WorldResult], noise: str, notes: list[str]) -> str:
    lines = [
        "# DDP: loom DataParallel vs torch DistributedDataParallel",
        "",
        *head_lines(command, when, machine()),
        f"Source: {source()}",
        "",
        f"Job: {job}",
        "",
        *table_lines(results),
        "",
        "Per round (medians above):",
        "",
        *round_lines(results),
        "",
        *closing_lines(TIMING, noise, notes),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def build_overrides(args: argparse.Namespace) -> list[str]:
    return job_overrides(args, "train.grad_accum=1", f"ddp.bucket_mb={args.bucket_mb}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_args(p, d_model=256)
    p.add_argument(
        "--micro-batch", type=int, default=2, help="sequences per rank per step (global batch = this x ranks)"
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per side per round")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="loom ddp.bucket_mb = torch bucket_cap_mb")
    p.add_argument("--repeats", type=int, default=8, help="rounds per world size, each with fresh models")
    p.add_argument("--worlds", default="2,4", help="comma-separated rank counts, one run_ranks each")
    p.add_argument(
        "--torch-grad-view",
        action="store_true",
        help="torch DDP with gradient_as_bucket_view=True (grads as bucket views, as loom keeps them)",
    )
    p.add_argument("--corpus", default="stdlib", help="data.corpus")
    p.add_argument("--out", type=Path, help="also write the result as markdown here")
    args = p.parse_args(argv)
    check_rounds(p, args)
    args.world_sizes = sizes(p, "--worlds", args.worlds, "world size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = bench_command("ddp.py")
    overrides = build_overrides(args)
    try:
        config, tokenizer = job_config(overrides)
        config.validate()
        prepare_dataset(config.data, tokenizer, log=print)  # tokenise once here; the ranks hit the cache
    except LoomError as exc:
        print(exc, file=sys.stderr)
        return 2
    model = config.model
    params = Transformer(model, seed=config.train.seed).num_params()
    cores = os.cpu_count() or 1
    job = (
        f"{model.preset} ({model.family}, {model.n_layers} layers, d_model {model.d_model}, {params / 1e6:.2f}M params = "
        f"{params * 4 / 2**20:.2f} MiB of fp32 gradients), {args.micro_batch} x {args.seq_len} tokens per rank per step, "
        f"bucket {args.bucket_mb:g} MiB, {args.steps} steps ({args.steps - args.warmup} timed) x {args.repeats} rounds "
        f"per side, fp32, gloo, 1 thread per rank; torch DDP "
        + (
            "with gradient_as_bucket_view=True, zero_grad(set_to_none=False)"
            if args.torch_grad_view
            else "defaults (gradient_as_bucket_view=False, zero_grad(set_to_none=True))"
        )
    )
    print(f"job: {job}")
    print(f"timing: {TIMING}\n")
    load_start = os.getloadavg()[0]
    results = []
    for world in args.world_sizes:
        result = bench_world(world, overrides, args)
        results.append(result)
        rows = zip(
            result.tps("loom"), result.tps("torch"), result.tps("nosync"), result.paired, result.ratios("loom_gloo")
        )
        for i, (lt, tt, nt, pr, gr) in enumerate(rows, 1):
            print(
                f"{world} ranks, round {i}: loom {lt:,.0f} tok/s, torch {tt:,.0f} tok/s, ratio {lt / tt:.3f}, "
                f"paired {pr:.3f}; loom over gloo ratio {gr:.3f}; no-sync {nt:,.0f} tok/s"
            )
        print(f"{world} ranks: {result.wall_s:.0f} s wall\n")

    ratios = [q for r in results for q in r.ratios()]
    noisy = [r.world for r in results if max(r.ratios()) - min(r.ratios()) > NOISY_SPREAD]
    noise = noise_head(load_start, cores, ratios) + (
        busy_warning(NOISY_SPREAD, f"{', '.join(map(str, noisy))} ranks") if noisy else "."
    )
    notes = interpretation(results, cores)
    print("\n".join(table_lines(results)))
    print()
    print(noise)
    for line in notes:
        print(line)
    write_result(args.out, lambda when: markdown(command, when, job, results, noise, notes))
    ok = all(r.bytes_match and r.loss_diff < AGREE_TOL for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
