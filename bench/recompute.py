"""Activation recomputation: step time and activation bytes of none, selective, full and auto on one job.

Sides (``common.py`` says how they are timed): ``Trainer.train_step`` with ``train.recompute`` =
none, selective, full, and full with ``recompute_layers = "auto"`` under a budget that the
planner says fits half the blocks recomputed; each side's activation bytes are the activation
meter's peak over its step (rank 0). Every policy also runs as ``loom train`` end to end.

Korthikanti et al. 2022 report selective recomputation at a few percent of step time for most
of full recomputation's saving on their GPUs, where the core attention is a small share of the
FLOPs; on a CPU with dropout on, the core attention is loom's dropout core
(``loom.model.dropout_attention``: fp32 probabilities and a one-byte mask kept over the causal
triangle's row runs, 5 bytes a score),
so what selective saves and costs here is measured, not assumed. Its saving grows with a s / h
(heads x tokens / width): the default job has 2, ``--heads 32 --d-model 1024 --seq-len 512``
Korthikanti's GPT-3 ratio, 16; ``--precision bf16`` runs under bf16 autocast, the 16-bit
activations their Table 2 counts (the linears' saved inputs halve, the core keeps its 5 bytes a
score). Checks (exit 1 if not): every policy's losses equal none's.

    python bench/recompute.py --out bench/results/recompute.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    LOOM_TRAIN,
    TIMING,
    TrainerSide,
    add_job_args,
    bench,
    bench_command,
    check_args,
    job_items,
    join,
    noise_line,
    prepare,
    result_head,
    rounds_table,
    run_round,
    tokens_per_step,
    write_result,
)

from loom.plan.rank_memory import predict_rank_memory

POLICIES = ("none", "selective", "full", "auto")


class PolicySide(TrainerSide):
    """The trainer's step under one policy; remembers the activation meter's reading of its last step."""

    def step(self, k: int) -> float:
        loss = self.trainer.train_step(k).loss
        self.activations = self.trainer.meter.take_step()["mem_activation_bytes"]
        self.recomputed = self.trainer.model.recompute.count
        return loss


def policy_items(items: list[str], policy: str, budget_gb: float) -> list[str]:
    if policy == "auto":
        return [*items, "train.recompute=full", 'train.recompute_layers="auto"', f"train.memory_budget_gb={budget_gb}"]
    return [*items, f"train.recompute={policy}"]


def rank_round(items: list[str], budget_gb: float, root: str, threads: int, round_index: int, alone: bool) -> dict:
    torch.set_num_threads(threads)
    sides = []
    for policy in POLICIES:
        ctx, config, _ = join(policy_items(items, policy, budget_gb))
        sides.append(PolicySide(policy, config, ctx, Path(root) / f"{policy}-{round_index}"))
    runs = run_round(sides, config.train.steps, round_index, alone)
    for side in sides:
        runs[side.name].facts.update(activations=side.activations, recomputed=side.recomputed)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_args(p, steps=20, warmup=4, repeats=3, layers=4, d_model=256)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per step (grad_accum 1)")
    p.add_argument("--dropout", type=float, default=0.1, help="model.dropout")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (and loom train's)")
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="train.precision (bf16: Korthikanti's 16-bit)"
    )
    args = p.parse_args(argv)
    check_args(p, args)
    items = job_items(
        args,
        f"train.micro_batch={args.micro_batch}",
        "train.grad_accum=1",
        f"model.dropout={args.dropout}",
        f"train.precision={args.precision}",
    )
    config = prepare(items)
    half = config.model.n_layers // 2
    full = dataclasses.replace(config, train=dataclasses.replace(config.train, recompute="full"))
    budget_gb = predict_rank_memory(full, 1, recompute_layers=half).total / 1e9 * 1.0001
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loom-bench-recompute-") as root:
        e2e = {f"{LOOM_TRAIN} {policy}": policy_items(items, policy, budget_gb) for policy in POLICIES}
        result = bench(
            "recompute",
            1,
            tokens_per_step(config, 1),
            rank_round,
            (items, budget_gb, root, args.threads),
            args,
            e2e,
            threads=args.threads,
        )
    base_act = result.facts["none"][0]["activations"]
    rows = [
        "| policy | blocks recomputed | tokens/s (trainer step) | step time / none | activation MiB | / none | "
        "loom train tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ok = True
    for policy in POLICIES:
        facts = result.facts[policy][0]
        tps = result.tps[policy]
        step_ratio = [base / mine for base, mine in zip(result.tps["none"], tps, strict=True)]
        e2e_name = f"{LOOM_TRAIN} {policy}"
        e2e_cell = f"{result.median(e2e_name):,.0f}" if e2e_name in result.tps else "-"
        recomputed = (
            config.model.n_layers if facts["recomputed"] is None and policy != "none" else facts["recomputed"] or 0
        )
        rows.append(
            f"| {policy} | {recomputed} of {config.model.n_layers} | {result.median(policy):,.0f} | "
            f"{statistics.median(step_ratio):.3f} ({min(step_ratio):.3f}-{max(step_ratio):.3f}) | "
            f"{facts['activations'] / 2**20:.1f} | {facts['activations'] / base_act:.3f} | {e2e_cell} |"
        )
        ok &= result.loss_diff(policy, "none") == 0.0
    checks = [f"- every policy's losses equal none's bit for bit: {'yes' if ok else 'NO'}."]
    job = (
        f"{config.model.preset} ({config.model.family}, {config.model.n_layers} layers, d {config.model.d_model}), "
        f"batch {args.micro_batch} x {args.seq_len}, dropout {args.dropout}, {args.steps} steps "
        f"({args.steps - args.warmup} timed) x {args.repeats} rounds, {args.precision}, {args.threads} threads; auto's budget "
        f"{budget_gb:.4f} GB (the planner's prediction with {half} blocks recomputed)"
    )
    noise = noise_line(load)
    print("\n".join([*rows, "", *checks, "", noise]))

    def render(when: str) -> str:
        lines = result_head("Activation recomputation: time and memory", bench_command("recompute.py"), when, job)
        lines += [*rows, "", "Checks:", "", *checks, "", "Per round:", ""]
        lines += [*rounds_table([result], [*POLICIES, *e2e]), "", f"Timing: {TIMING}", "", noise, ""]
        return "\n".join(lines)

    write_result(args.out, render)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
