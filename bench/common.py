"""The benchmark harness: ranks, rotated rounds, ``loom train`` end to end, records, ratios, result files.

Every script in ``bench/`` compares loom with a peer on one job and keeps only what is its
own: the peer's sides and its table. The rest is here:

- **loom's side is the trainer's own step.** :class:`TrainerSide` builds ``Trainer`` from the
  job's config (through ``loom.train.wiring.build_rank``, as ``loom train`` does) and times
  ``Trainer.train_step``: batch, forward, backward, sync, the loss for the metrics, clip,
  update. Peers get the same batches (:func:`job_batches`, cut as the trainer cuts them) and
  the same lr (:func:`lr_of`).
- **Rounds.** :func:`run_round` (on every rank) builds fresh sides and runs step k of every
  side back to back, the order rotating step by step and round by round, each side's step
  starting after a barrier of all ranks; a step's time is the slowest rank's. :func:`bench`
  (the parent) starts the ranks once per round (``run_ranks``, gloo, one thread per rank)
  and, between rounds, runs ``loom train`` itself (:func:`loom_train`).
- **loom train end to end**: the command a user runs, in its own processes, with loom's own
  launcher and thread settings; its figure is the median ``tokens_per_s`` of
  ``metrics.jsonl`` over the timed steps (rank 0's loop time per step: ``train_step``, the
  record and its logging; evaluation and checkpoints aside, off in these jobs). It is compared
  with each peer run *alone* in the same round (all its steps, nothing interleaved: as its
  users run it), not with the interleaved peer, whose steps share the machine's caches with
  loom's sides. A peer alone is timed as ``loom train`` is: its loop has no barrier between
  steps, and a step's time is rank 0's lap from the end of the previous step. (Until the
  commit named in ``history.md`` it was timed like the interleaved sides, each step after a
  barrier and the slowest rank's: 1-3% slower for torch DDP on 2 gloo ranks than its laps,
  measured, so loom train was compared with a slower peer than its users run.)
- **Host allocation.** ``loom train`` applies loom's host allocation policy
  (``loom.parallel.host_allocator``: glibc's mmap threshold fixed at 4 MiB, torch's huge pages
  for large tensors in processes of one thread) as it starts; the peers alone run with glibc's and torch's defaults, as
  their users run them. In the interleaved rounds a side and its peer share one process: the
  trainer fixes the mmap threshold for both, and neither has huge pages (torch reads that switch
  at the process's first tensor, before any side exists).
- **Thread placement.** Bench ranks and ``loom train``'s ranks are placed alike: each pins its
  compute thread to its own core after its process groups exist (``share_cores`` from
  ``init_distributed``), and the backend's message threads stay free. Until 76fac10 only the
  bench ranks were placed so (``run_ranks`` creates the group before the pinning), which made
  ``loom train`` at tp 2 10-14% slower than the same trainer step here.
- **Waits.** loom's sides wait for their collectives as ``loom train`` does (``parallel.comm_wait``:
  with a core per rank, polling an all-reduce, all-gather or broadcast before sleeping on it,
  since 71036b0); the peers call torch.distributed as their users do, sleeping on each call.
- **Figures.** A bench side's tokens/s in a round is the global tokens per step over the
  median step time after the warm-up; the table gives the median over rounds, and each
  ratio as the median of the per-round ratios with their range (a side and its peer in one
  round ran interleaved, so a round's ratio is a paired figure; the ratio of the two sides'
  medians would pair different rounds, and this host's speed drifts by up to 20-30% over a
  bench's rounds).
  A goal is "met" when every round's ratio reaches it, "met in the median" when the median
  does but some round does not (the rounds scatter more than the margin: no claim), else
  "missed".
- **Result files** name the command, date, machine and the loom commit they measured.

Scripts import these as ``from common import ...`` (``python bench/X.py`` puts ``bench/``
on ``sys.path``); rank functions are module-level functions of the script, so the spawned
ranks import them by reference.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

import loom
from loom.config import Config, load_config
from loom.distributed.context import DistContext, init_distributed
from loom.distributed.spawn import run_ranks
from loom.optim.lr import lr_at
from loom.train.batches import batch_offsets, batch_rows, get_batch
from loom.train.data import TokenData, prepare_dataset
from loom.train.tokenizer import load_tokenizer
from loom.train.trainer import TRAIN_STREAM, Trainer

LOOM_TRAIN = "loom train"  # the name of the end-to-end figure in every table
ALONE = "alone"  # suffix of a peer's figure when it ran by itself, as loom train does

# ----------------------------------------------------------------------------- provenance


def machine(gpu: bool = False) -> str:
    """CPU model (from /proc/cpuinfo), core count, optionally the GPU, and the torch and Python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu_part = f", GPU {torch.cuda.get_device_name()}" if gpu and torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu_part}; torch {torch.__version__}, Python {platform.python_version()}"


def source_line() -> str:
    """Which loom is measured (read-only git): the commit, and any uncommitted change under src/."""
    root = Path(__file__).resolve().parents[1]
    package = Path(loom.__file__).resolve().parent
    where = "" if package == root / "src" / "loom" else f" (but loom was imported from {package})"

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *cmd], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--", "src").splitlines()]
    state = "src/ as committed" if not changed else f"uncommitted changes under src/: {', '.join(changed)}"
    return f"loom at commit {commit}; {state}{where}"


def bench_command(script: str) -> str:
    """The command line as ``python bench/<script> <args>``."""
    return f"python bench/{script}" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))


def write_result(out: Path | None, render: Callable[[str], str]) -> None:
    """If ``out`` is set, write ``render(when)`` there (``when``: now, UTC, to the minute) and say so."""
    if out:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(when), encoding="utf-8")
        print(f"wrote {out}")


def result_head(title: str, command: str, when: str, job: str) -> list[str]:
    """The top of a result file: title, command, date, machine, the loom measured, the job."""
    return [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {when}",
        "",
        f"Machine: {machine()}",
        "",
        f"Source: {source_line()}",
        "",
        f"Job: {job}",
        "",
    ]


# ----------------------------------------------------------------------------- the job


def add_job_args(
    p: argparse.ArgumentParser, *, layers: int = 0, d_model: int = 0, steps: int = 30, warmup: int = 4, repeats: int = 5
) -> None:
    """The flags every script shares: the model, the batch, steps, warm-up, rounds, corpus, output."""
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--layers", type=int, default=layers, help="model.n_layers (0: the preset's)")
    p.add_argument("--d-model", type=int, default=d_model, help="model.d_model (0: the preset's)")
    p.add_argument("--heads", type=int, default=0, help="model.n_heads (0: the preset's)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per side per round")
    p.add_argument("--warmup", type=int, default=warmup, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=repeats, help="rounds, each with fresh sides and a loom train run")
    p.add_argument("--corpus", default="stdlib", help="data.corpus")
    p.add_argument("--no-e2e", action="store_true", help="skip the loom train end-to-end runs (a quick check)")
    p.add_argument("--out", type=Path, help="also write the result as markdown here")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject --steps that leave fewer than 2 timed steps and --repeats below 1."""
    if args.steps < args.warmup + 2:
        p.error(f"--steps {args.steps} leaves fewer than 2 timed steps after --warmup {args.warmup}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")


def sizes(p: argparse.ArgumentParser, flag: str, text: str, what: str) -> list[int]:
    """Parse a comma-separated list of sizes, each at least 2 (``what`` names them in the error)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        p.error(f"{flag} {text!r} is not a comma-separated list of integers")
    if any(v < 2 for v in values):
        p.error(f"every {what} in {flag} must be at least 2")
    return values


def job_items(args: argparse.Namespace, *extra: str) -> list[str]:
    """``--set`` items of the job, as ``loom train`` takes them: preset, steps, sequence, fp32 on
    the CPU, no evaluation, checkpoint or sample during the timed steps, ``extra``, then whichever of
    --layers, --d-model, --heads is not 0 (and ``model.max_seq_len`` for a --seq-len beyond the preset's)."""
    items = [
        f"model.preset={args.preset}",
        f"train.steps={args.steps}",
        f"train.seq_len={args.seq_len}",
        "train.precision=fp32",
        "train.device=cpu",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.sample_tokens=0",
        f"data.corpus={json.dumps(args.corpus)}",
        *extra,
    ]
    for key, value in (("n_layers", args.layers), ("d_model", args.d_model), ("n_heads", args.heads)):
        if value:
            items.append(f"model.{key}={value}")
    if args.seq_len > load_config(None, [f"model.preset={args.preset}"]).model.max_seq_len:
        items.append(f"model.max_seq_len={args.seq_len}")  # positions for the longer sequence
    return items


def job_config(items: Sequence[str]) -> Config:
    """The validated config of ``items``, its vocabulary filled in from the tokenizer."""
    config = load_config(None, list(items))
    config.model.vocab_size = config.model.vocab_size or load_tokenizer(config.data.tokenizer).vocab_size
    config.validate()
    return config


def prepare(items: Sequence[str]) -> Config:
    """In the parent, before any rank starts: validate the job and tokenise its corpus once (the
    ranks and the loom train runs then hit the cache)."""
    config = job_config(items)
    prepare_dataset(config.data, load_tokenizer(config.data.tokenizer), log=print)
    return config


def lr_of(config: Config, step: int) -> float:
    """The learning rate of ``step``, as the trainer sets it."""
    train = config.train
    return lr_at(step, train.lr, train.warmup_steps, train.steps, train.min_lr_ratio)


def job_batches(
    config: Config, data: TokenData, dp: int, dp_rank: int, device, steps: Sequence[int] | None = None
) -> list[list[tuple]]:
    """Per step (``steps``, default all), this dp rank's micro-batches (x, y), cut as
    ``Trainer.train_step`` cuts them. Peers cut each step's inside the step, as the trainer does."""
    train, shape = config.train, config.batch(dp=dp)
    out = []
    for step in range(train.steps) if steps is None else steps:
        offsets = batch_offsets(len(data.train), train.seq_len, shape.global_batch, train.seed, step, TRAIN_STREAM)
        rows = [offsets[batch_rows(shape.micro_batch, shape.grad_accum, dp_rank, k)] for k in range(shape.grad_accum)]
        out.append([get_batch(data.train, train.seq_len, r, device) for r in rows])
    return out


def tokens_per_step(config: Config, dp: int) -> int:
    return config.batch(dp=dp).global_batch * config.train.seq_len


# ----------------------------------------------------------------------------- sides


class Side:
    """One implementation of the job's optimizer step on this rank. ``step(k)`` runs step k and
    returns the loss a trainer logs (the global batch's mean); ``ledger`` (loom only) counts bytes."""

    name = ""
    ledger = None

    def step(self, k: int) -> float:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the side holds (workers, hooks) once its round is over."""


class TrainerSide(Side):
    """loom: ``Trainer.train_step``, the step ``loom train`` runs, on a trainer built from ``config``."""

    def __init__(self, name: str, config: Config, ctx: DistContext, run_dir: Path) -> None:
        self.name = name
        self.trainer = Trainer(config, run_dir, console=Console(file=io.StringIO()), live_progress=False, dist=ctx)
        self.ledger = ctx.ledger

    def step(self, k: int) -> float:
        return self.trainer.train_step(k).loss

    def close(self) -> None:
        update = self.trainer.update
        if getattr(update, "ddp", None) is not None:
            update.ddp.close()  # the shared-memory worker


@dataclass
class SideRun:
    """One side's record in one round, as one rank saw it."""

    step_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    bytes: list[dict] = field(default_factory=list)  # loom: ledger totals of each step (comm_bytes_dp, ...)
    by_tag: list[dict] = field(default_factory=list)  # loom: each step's bytes by "group/tag"
    facts: dict = field(default_factory=dict)  # anything else the script records (buckets, state bytes)
    # laps: step_s are the laps of a loop with no barrier (a side run alone); its figure is rank 0's,
    # as loom train's tokens_per_s is rank 0's lap. Else each step started after a barrier: the slowest rank's
    laps: bool = False


def join(items: Sequence[str]) -> tuple[DistContext, Config, TokenData]:
    """On a rank: the process group of the job's layout, its config and its (cached) data."""
    config = job_config(items)
    ctx = init_distributed(config.parallel)
    return ctx, config, prepare_dataset(config.data, load_tokenizer(config.data.tokenizer))


def run_round(sides: Sequence[Side], steps: int, round_index: int, alone: bool = False) -> dict[str, SideRun]:
    """Step k of every side back to back, the order rotating with k and the round; every side's
    step starts after a barrier of all ranks (not timed). ``alone``: each side runs all its
    steps before the next one starts, with no barrier between them, as a user's loop runs;
    a step's time is then its lap, from the end of the previous step (:attr:`SideRun.laps`).
    Closes the sides."""
    runs = {side.name: SideRun(laps=alone) for side in sides}
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    gc.collect()
    if alone:
        for side in sides:
            barrier()
            mark = _mark(side)
            c0, t0 = time.process_time(), time.perf_counter()
            for k in range(steps):
                loss = side.step(k)
                t, c = time.perf_counter(), time.process_time()
                _record(side, runs[side.name], t - t0, c - c0, loss, mark)
                mark = _mark(side)
                c0, t0 = time.process_time(), time.perf_counter()  # the harness's own record is not the side's
    else:
        for k in range(steps):
            turn = (round_index + k) % len(sides)
            for side in [*sides[turn:], *sides[:turn]]:
                barrier()
                mark = _mark(side)
                c0, t0 = time.process_time(), time.perf_counter()
                loss = side.step(k)
                t, c = time.perf_counter(), time.process_time()
                _record(side, runs[side.name], t - t0, c - c0, loss, mark)
    barrier()
    for side in sides:
        side.close()
    return runs


def _mark(side: Side) -> int:
    """Before a step: clear the side's ledger totals; the last entry's number (0 without a ledger)."""
    if side.ledger is None:
        return 0
    side.ledger.take_step_totals()
    return max((e.seq for e in side.ledger.recent(1)), default=0)


def _record(side: Side, run: SideRun, step_s: float, cpu_s: float, loss: float, mark: int) -> None:
    """After a step: its times and loss, and (loom) its ledger totals and bytes by group/tag since ``mark``."""
    run.step_s.append(step_s)
    run.cpu_s.append(cpu_s)
    run.losses.append(loss)
    if side.ledger is not None:
        run.bytes.append(side.ledger.take_step_totals())
        tags: dict[str, float] = {}
        for e in side.ledger.recent(1000):
            if e.seq > mark:
                tags[f"{e.group}/{e.tag}"] = tags.get(f"{e.group}/{e.tag}", 0) + e.bytes_sent
        run.by_tag.append(tags)


# ----------------------------------------------------------------------------- loom train, end to end


def loom_train(
    items: Sequence[str], nproc: int, warmup: int, threads: int | None = None, timeout_s: float = 1800
) -> list[float]:
    """Run ``loom train --nproc N --set ...`` as a user would; the timed steps' ``tokens_per_s``.
    ``threads``: OMP_NUM_THREADS for it (default: unset, loom decides)."""
    with tempfile.TemporaryDirectory(prefix="loom-bench-train-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "loom.cli", "train", "--run-dir", str(run_dir), "--no-progress"]
        cmd += ["--nproc", str(nproc)] + [arg for item in items for arg in ("--set", item)]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise RuntimeError(f"loom train failed ({done.returncode}): {shlex.join(cmd)}\n{tail}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records[warmup:]]


# ----------------------------------------------------------------------------- the parent: rounds and results


@dataclass
class Result:
    """One job (one row of a table): tokens/s per round of every side and of loom train."""

    label: str
    tokens: int  # tokens per step
    warmup: int
    tps: dict[str, list[float]] = field(default_factory=dict)  # side -> tokens/s per round
    losses: dict[str, list[list[float]]] = field(default_factory=dict)  # side -> per round, rank 0's losses
    bytes: dict[str, list[dict]] = field(default_factory=dict)  # loom side -> rank 0's ledger totals, every step
    by_tag: dict[str, list[dict]] = field(default_factory=dict)  # loom side -> rank 0's bytes by group/tag, every step
    facts: dict[str, list[dict]] = field(default_factory=dict)  # side -> per round, rank 0's facts
    step_bytes_by_rank: dict[str, set] = field(default_factory=dict)  # side -> distinct totals over ranks and steps
    wall_s: float = 0.0

    def add_round(self, ranks: list[dict[str, SideRun]]) -> None:
        for name in ranks[0]:
            if ranks[0][name].laps:  # a loop without barriers: rank 0's laps, as loom train's figure
                times = ranks[0][name].step_s[self.warmup :]
            else:  # each step after a barrier: the slowest rank's time
                times = [max(step) for step in zip(*(r[name].step_s for r in ranks), strict=True)][self.warmup :]
            self.tps.setdefault(name, []).append(self.tokens / statistics.median(times))
            self.losses.setdefault(name, []).append(ranks[0][name].losses)
            self.facts.setdefault(name, []).append(ranks[0][name].facts)
            if ranks[0][name].bytes:
                self.bytes.setdefault(name, []).extend(ranks[0][name].bytes)
                self.by_tag.setdefault(name, []).extend(ranks[0][name].by_tag)
                seen = self.step_bytes_by_rank.setdefault(name, set())
                seen |= {json.dumps(b, sort_keys=True) for r in ranks for b in r[name].bytes[1:]}

    def median(self, side: str) -> float:
        return statistics.median(self.tps[side])

    def ratios(self, side: str, peer: str) -> list[float]:
        """Per round: side's tokens/s over the peer's (a bench side ran interleaved with it)."""
        return [a / b for a, b in zip(self.tps[side], self.tps[peer], strict=True)]

    def ratio(self, side: str, peer: str) -> float:
        """The median of the per-round (paired) ratios."""
        return statistics.median(self.ratios(side, peer))

    def verdict(self, side: str, peer: str, goal: float) -> str:
        rounds = self.ratios(side, peer)
        if min(rounds) >= goal:
            return "met"
        return "met in the median only (rounds scatter across the goal)" if self.ratio(side, peer) >= goal else "missed"

    def loss_diff(self, side: str, peer: str) -> float:
        """Largest |loss difference| between two sides over every step of every round."""
        return max(
            abs(a - b)
            for mine, theirs in zip(self.losses[side], self.losses[peer], strict=True)
            for a, b in zip(mine, theirs, strict=True)
        )


def bench(
    label: str,
    world: int,
    tokens: int,
    rank_fn: Callable,
    rank_args: tuple,
    args: argparse.Namespace,
    e2e: dict[str, Sequence[str]],
    timeout_s: float = 900,
    threads: int | None = None,
) -> Result:
    """``args.repeats`` rounds on ``world`` ranks. A round: ``rank_fn(*rank_args, round_index, alone)``
    with ``alone=False`` (loom's sides and the peers, interleaved), then with ``alone=True`` (the
    peers only, each running alone: their figures are named "<peer> alone") and one ``loom
    train`` run per entry of ``e2e`` (name -> --set items, their order rotating with the round),
    which of the two first alternating from round to round. loom train is compared with the peers
    alone: both ran as users run them."""
    result = Result(label, tokens, args.warmup)
    began = time.perf_counter()

    def peers_alone(r: int) -> None:
        alone = run_ranks(rank_fn, world, args=(*rank_args, r, True), timeout_s=timeout_s)
        result.add_round([{f"{name} {ALONE}": run for name, run in rank.items()} for rank in alone])

    def end_to_end(r: int) -> None:
        runs = list(e2e.items())
        for name, items in runs[r % len(runs) :] + runs[: r % len(runs)]:  # the order rotates with the round
            result.tps.setdefault(name, []).append(statistics.median(loom_train(items, world, args.warmup, threads)))

    for r in range(args.repeats):
        result.add_round(run_ranks(rank_fn, world, args=(*rank_args, r, False), timeout_s=timeout_s))
        if not args.no_e2e:  # which of the two goes first alternates, so a drift of the machine's speed cancels
            for run in (peers_alone, end_to_end) if r % 2 == 0 else (end_to_end, peers_alone):
                run(r)
        line = ", ".join(f"{name} {tps[r]:,.0f}" for name, tps in result.tps.items() if len(tps) > r)
        print(f"{label}, round {r + 1}: tokens/s {line}", flush=True)
    result.wall_s = time.perf_counter() - began
    return result


# ----------------------------------------------------------------------------- tables and lines


def fmt_ratio_cell(result: Result, side: str, peer: str) -> str:
    rounds = result.ratios(side, peer)
    return f"{result.ratio(side, peer):.3f} ({min(rounds):.2f}-{max(rounds):.2f})"


def comparison_table(
    results: Sequence[Result], head: str, columns: Sequence[str], ratios: Sequence[tuple[str, str]]
) -> list[str]:
    """| head | tokens/s of each of ``columns`` | each (side, peer) ratio with its per-round range |."""
    names = [f"{c} tokens/s" for c in columns] + [f"{a} / {b}" for a, b in ratios]
    lines = [f"| {head} | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for r in results:
        cells = [f"{r.median(c):,.0f}" if c in r.tps else "-" for c in columns]
        cells += [fmt_ratio_cell(r, a, b) if a in r.tps and b in r.tps else "-" for a, b in ratios]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return lines


def rounds_table(results: Sequence[Result], sides: Sequence[str]) -> list[str]:
    """Every round's tokens/s of every side."""
    lines = [
        "| job | round | " + " | ".join(f"{s} tokens/s" for s in sides) + " |",
        "| --- | ---: |" + " ---: |" * len(sides),
    ]
    for r in results:
        for i in range(len(r.tps[sides[0]])):
            cells = [f"{r.tps[s][i]:,.0f}" if s in r.tps and i < len(r.tps[s]) else "-" for s in sides]
            lines.append(f"| {r.label} | {i + 1} | " + " | ".join(cells) + " |")
    return lines


def goal_lines(results: Sequence[Result], pairs: Sequence[tuple[str, str, float]]) -> list[str]:
    """One line per (loom side, peer, goal) and job: the ratio, its rounds and the verdict."""
    out = []
    for r in results:
        for side, peer, goal in pairs:
            if side in r.tps and peer in r.tps:
                rounds = r.ratios(side, peer)
                out.append(
                    f"- {r.label}: {side} / {peer} = {r.ratio(side, peer):.3f} (rounds {min(rounds):.3f}-"
                    f"{max(rounds):.3f}, {sum(q >= goal for q in rounds)} of {len(rounds)} at or above {goal}): "
                    f"goal >= {goal}: {r.verdict(side, peer, goal)}"
                )
    return out


def noise_line(load_start: float) -> str:
    cores = os.cpu_count() or 1
    return (
        f"Load: 1-minute load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
        f"({cores} cores). Ranks beyond the cores time-share them: such rows compare loom and the peer under "
        "the same contention and say nothing about scaling."
    )


TIMING = (
    "per round, fresh sides run step k back to back, the order rotating with k and the round, each side's step "
    "starting after a barrier; a step's time is the slowest rank's (a side run alone: rank 0's lap, no barriers); "
    "a side's tokens/s is global tokens per step over "
    "its median step time after the warm-up, and the table gives the median over rounds, each ratio as the median of "
    "the per-round ratios with their range (a round's sides ran interleaved, so its ratio is paired). loom's sides are Trainer.train_step as "
    f"`loom train` runs it (batch, forward, backward, sync, the loss for the metrics, clip, update). After the "
    f"interleaved sides, each peer runs again by itself (`{ALONE}`: all its steps, nothing interleaved, no barrier "
    f"between them; timed as `{LOOM_TRAIN}` is, by rank 0's laps) and `{LOOM_TRAIN}` "
    "runs (which goes first alternating by round; several `loom train` runs in an order rotating with the round): "
    "the command itself on the same job, with loom's own launcher and thread settings, its figure the median "
    f"tokens_per_s of its metrics.jsonl over the steps after the warm-up; `{LOOM_TRAIN}` is compared with the peers "
    f"`{ALONE}` (both run as users run them), loom's interleaved side with the interleaved peer."
)
