"""Where `loom train` over gloo stands against torch DDP, in fresh processes: three sides, paired.

``ddp.py`` compares `loom train` with torch DDP run alone once per round, and its rounds
scatter by more than the gloo goal's margin. This script splits that comparison in two, each
part paired, every side in processes of its own, as users run them:

- ``torch DDP alone``: ``ddp.py``'s peer, all its steps in fresh bench ranks, no barrier between
  them, timed by rank 0's laps;
- ``loom step alone``: ``Trainer.train_step`` with ``ddp.transport = backend`` (the gloo group),
  the same way in fresh bench ranks;
- ``loom train (gloo)``: the command itself, its figure the median ``tokens_per_s`` (rank 0's lap).

A pair runs the three one after the other, the order rotating pair by pair, so a drift of the
host's speed falls on each side alike. Each side's figure in a pair is the global tokens per step
over its median lap after ``--warmup`` steps; the table gives each ratio's median over the
pairs, its range and how many pairs reach 1.0:

- loom step alone / torch DDP alone: the two DDP implementations, each alone;
- loom train / loom step alone: what the command adds to the step (its loop: record, gather,
  metrics line; launcher and process settings);
- loom train / torch DDP alone: the goal of ``ddp.py`` (>= 1.0 over gloo).

    python bench/ddp_pairs.py --out bench/results/epyc/ddp_pairs.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import (
    LOOM_TRAIN,
    TrainerSide,
    add_job_args,
    bench_command,
    check_args,
    job_config,
    job_items,
    join,
    loom_train,
    noise_line,
    prepare,
    result_head,
    run_round,
    tokens_per_step,
    write_result,
)
from ddp import TORCH, rank_round

from loom.distributed.spawn import run_ranks

TORCH_ALONE, LOOM_ALONE, TRAIN_GLOO = f"{TORCH} alone", "loom step alone", f"{LOOM_TRAIN} (gloo)"
SIDES = (TORCH_ALONE, LOOM_ALONE, TRAIN_GLOO)
RATIOS = ((LOOM_ALONE, TORCH_ALONE), (TRAIN_GLOO, LOOM_ALONE), (TRAIN_GLOO, TORCH_ALONE))


def loom_alone(items: list[str], root: str) -> list[float]:
    """On a rank: loom's trainer step over the gloo group, all its steps alone; this rank's laps."""
    ctx, config, _ = join(items)
    side = TrainerSide(LOOM_ALONE, job_config([*items, "ddp.transport=backend"]), ctx, Path(root) / "loom")
    return run_round([side], config.train.steps, 0, alone=True)[LOOM_ALONE].step_s


def torch_alone(items: list[str], root: str) -> list[float]:
    """On a rank: ``ddp.py``'s torch DDP side, all its steps alone; this rank's laps."""
    return rank_round(items, root, 0, True)[TORCH].step_s


def one_side(name: str, items: list[str], world: int, root: str, warmup: int, tokens: int) -> float:
    """One side's tokens/s in fresh processes: global tokens per step over rank 0's median lap."""
    if name == TRAIN_GLOO:
        return statistics.median(loom_train([*items, "ddp.transport=backend"], world, warmup))
    laps = run_ranks(loom_alone if name == LOOM_ALONE else torch_alone, world, args=(items, root), timeout_s=900)[0]
    return tokens / statistics.median(laps[warmup:])


def ratio_line(pairs: list[dict[str, float]], side: str, peer: str) -> str:
    ratios = [p[side] / p[peer] for p in pairs]
    reach = sum(r >= 1.0 for r in ratios)
    return (
        f"| {side} / {peer} | {statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} | "
        f"{reach} of {len(ratios)} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_args(p, d_model=256, steps=40, repeats=10)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="loom ddp.bucket_mb = torch bucket_cap_mb")
    p.add_argument("--world", type=int, default=2, help="ranks")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.world < 2:
        p.error("--world must be at least 2")
    items = job_items(
        args, f"train.micro_batch={args.micro_batch}", "train.grad_accum=1", f"ddp.bucket_mb={args.bucket_mb}"
    )
    config = prepare(items)
    tokens = tokens_per_step(config, args.world)
    load = os.getloadavg()[0]
    pairs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="loom-bench-ddp-pairs-") as root:
        for k in range(args.repeats):
            order = [*SIDES[k % 3 :], *SIDES[: k % 3]]  # the order rotates pair by pair
            pair = {name: one_side(name, items, args.world, root, args.warmup, tokens) for name in order}
            pairs.append(pair)
            print(f"pair {k + 1}: " + ", ".join(f"{n} {pair[n]:,.0f}" for n in SIDES) + " tokens/s", flush=True)

    table = ["| ratio | median | range | pairs at or above 1.0 |", "| --- | ---: | ---: | ---: |"]
    table += [ratio_line(pairs, side, peer) for side, peer in RATIOS]
    per_pair = ["| pair | " + " | ".join(f"{n} tokens/s" for n in SIDES) + " |", "| ---: |" + " ---: |" * len(SIDES)]
    per_pair += [f"| {k + 1} | " + " | ".join(f"{p[n]:,.0f}" for n in SIDES) + " |" for k, p in enumerate(pairs)]
    noise = noise_line(load)
    print("\n".join([*table, "", noise]))
    job = (
        f"{config.model.preset} ({config.model.family}, {config.model.n_layers} layers, d_model {config.model.d_model}), "
        f"{args.world} ranks over gloo, {args.micro_batch} x {args.seq_len} tokens per rank per step, bucket "
        f"{args.bucket_mb:g} MiB, {args.steps} steps ({args.steps - args.warmup} timed) a side, {args.repeats} pairs, "
        "fp32, 1 thread per rank"
    )

    def render(when: str) -> str:
        lines = result_head(
            "DDP over gloo: loom train, loom's step and torch DDP, paired", bench_command("ddp_pairs.py"), when, job
        )
        lines += [*table, "", "Per pair:", "", *per_pair, "", noise, ""]
        return "\n".join(lines)

    write_result(args.out, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
