"""loom's data parallelism against torch's DistributedDataParallel on the same multi-rank job.

Sides (``common.py`` says how they are timed):

- ``loom``: ``Trainer.train_step`` with ``ddp.transport = auto``, the default: on one host the
  gradient buckets travel through shared memory (``loom.distributed.shm``);
- ``loom (gloo)``: the same with ``ddp.transport = backend``: the gloo group torch's side uses,
  so the two DDP implementations meet on equal transport;
- ``torch DDP``: ``DistributedDataParallel`` over the same model and initial weights, as its
  users write the loop: forward through DDP, backward (its bucket all-reduces), the loss
  all-reduced for the log (DDP does not average the loss; the trainer logs the global mean),
  clip, AdamW (``build_adamw``), ``zero_grad(set_to_none=True)``; bucket cap = ``ddp.bucket_mb``.
- ``loom train`` and ``loom train (gloo)``: the command, end to end, with each transport.

Goals: loom train at least 1.0x torch DDP, over shared memory and over the same gloo backend.
Checks (exit 1 if not): loom's per-step dp bytes equal 2(n-1)/n x (Psi + 1) x 4 (the gradients
and the loss riding in the last bucket, ring model), and loom's losses equal torch's to 1e-5.

    python bench/ddp.py --out bench/results/ddp.md
    python bench/ddp.py --d-model 768 --worlds 2 --repeats 4 --out bench/results/ddp_d768.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import (
    ALONE,
    LOOM_TRAIN,
    TIMING,
    Result,
    Side,
    TrainerSide,
    add_job_args,
    bench,
    bench_command,
    check_args,
    comparison_table,
    goal_lines,
    job_batches,
    job_config,
    job_items,
    join,
    lr_of,
    noise_line,
    prepare,
    result_head,
    rounds_table,
    run_round,
    sizes,
    tokens_per_step,
    write_result,
)
from torch.nn.parallel import DistributedDataParallel

from loom.model.transformer import Transformer
from loom.optim.adamw import build_adamw

GOAL = 1.0
AGREE_TOL = 1e-5
LOOM, LOOM_GLOO, TORCH = "loom", "loom (gloo)", "torch DDP"
TRAIN_GLOO = f"{LOOM_TRAIN} (gloo)"


class TorchDDP(Side):
    """torch's DistributedDataParallel, the loop as its users write it."""

    name = TORCH

    def __init__(self, config, ctx, data) -> None:
        self.config = config
        comm = ctx.comm("dp")
        self.group, self.world = comm.group, comm.size
        model = Transformer(config.model, seed=config.train.seed, device=ctx.device)
        self.model = DistributedDataParallel(
            model, process_group=self.group, bucket_cap_mb=config.ddp.bucket_mb, forward_sync_buffers=False
        )
        self.optimizer = build_adamw(model, config.train, ctx.device)
        self.data, self.device, self.dp = data, ctx.device, (comm.size, comm.rank)

    def step(self, k: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_of(self.config, k)
        ((x, y),) = job_batches(self.config, self.data, *self.dp, self.device, steps=[k])[0]
        logits = self.model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=self.group)
        value = total.item() / self.world
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value


def rank_round(items: list[str], root: str, round_index: int, alone: bool) -> dict:
    ctx, config, data = join(items)
    if alone:
        return run_round([TorchDDP(config, ctx, data)], config.train.steps, round_index, alone)
    gloo = job_config([*items, "ddp.transport=backend"])
    sides = [
        TrainerSide(LOOM, config, ctx, Path(root) / f"loom-{round_index}"),
        TrainerSide(LOOM_GLOO, gloo, ctx, Path(root) / f"gloo-{round_index}"),
        TorchDDP(config, ctx, data),
    ]
    transport = sides[0].trainer.update.ddp.transport
    runs = run_round(sides, config.train.steps, round_index)
    runs[LOOM].facts["transport"] = transport
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_args(p, d_model=256, steps=30, repeats=6)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="loom ddp.bucket_mb = torch bucket_cap_mb")
    p.add_argument("--worlds", default="2,4", help="comma-separated rank counts")
    args = p.parse_args(argv)
    check_args(p, args)
    worlds = sizes(p, "--worlds", args.worlds, "world size")
    items = job_items(
        args, f"train.micro_batch={args.micro_batch}", "train.grad_accum=1", f"ddp.bucket_mb={args.bucket_mb}"
    )
    config = prepare(items)
    psi = Transformer(config.model, seed=config.train.seed, device="meta").num_params()
    load = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="loom-bench-ddp-") as root:
        for world in worlds:
            e2e = {LOOM_TRAIN: items, TRAIN_GLOO: [*items, "ddp.transport=backend"]}
            tokens = tokens_per_step(config, world)
            results.append(bench(f"{world} ranks", world, tokens, rank_round, (items, root), args, e2e))

    job = (
        f"{config.model.preset} ({config.model.family}, {config.model.n_layers} layers, d_model "
        f"{config.model.d_model}, {psi / 1e6:.2f}M parameters), {args.micro_batch} x {args.seq_len} tokens per rank "
        f"per step, bucket {args.bucket_mb:g} MiB, {args.steps} steps ({args.steps - args.warmup} timed) x "
        f"{args.repeats} rounds, fp32, gloo, 1 thread per rank"
    )
    checks, ok = [], True
    for r, world in zip(results, worlds, strict=True):
        formula = Fraction(2 * (world - 1), world) * (psi + 1) * 4
        sent = {Fraction(b) for b in _dp_bytes(r, LOOM) | _dp_bytes(r, LOOM_GLOO)}
        diff = max(r.loss_diff(LOOM, TORCH), r.loss_diff(LOOM_GLOO, TORCH))
        bytes_ok, loss_ok = sent == {formula}, diff < AGREE_TOL
        ok &= bytes_ok and loss_ok
        transport = "/".join(sorted({f.get("transport", "?") for f in r.facts[LOOM]}))
        checks.append(
            f"- {r.label}: loom's buckets travelled through {transport} (loom) and the backend (loom (gloo)); dp "
            f"bytes per step per rank {', '.join(f'{float(b):,.0f}' for b in sorted(sent))} against 2(n-1)/n x "
            f"(Psi + 1) x 4 = {float(formula):,.0f}: {'equal' if bytes_ok else 'DIFFERENT'}; losses of loom and "
            f"torch DDP differ by at most {diff:.1e} ({'agree' if loss_ok else 'DIFFER'})."
        )
    alone = f"{TORCH} {ALONE}"
    e2e = [] if args.no_e2e else [alone, LOOM_TRAIN, TRAIN_GLOO]
    pairs = [(LOOM, TORCH), (LOOM_GLOO, TORCH), *([] if args.no_e2e else [(LOOM_TRAIN, alone), (TRAIN_GLOO, alone)])]
    sides = [TORCH, LOOM, LOOM_GLOO, *e2e]
    table = comparison_table(results, "ranks", sides, pairs)
    goals = goal_lines(results, [(a, b, GOAL) for a, b in reversed(pairs)])
    noise = noise_line(load)
    print("\n".join([*table, "", *goals, "", *checks, "", noise]))

    def render(when: str) -> str:
        lines = result_head("DDP: loom vs torch DistributedDataParallel", bench_command("ddp.py"), when, job)
        lines += [*table, "", "Goals:", "", *goals, "", "Checks:", "", *checks, "", "Per round:", ""]
        lines += [*rounds_table(results, sides), "", f"Timing: {TIMING}", "", noise, ""]
        return "\n".join(lines)

    write_result(args.out, render)
    return 0 if ok else 1


def _dp_bytes(result: Result, side: str) -> set:
    return {b["comm_bytes_dp"] for b in result.bytes.get(side, [])}


if __name__ == "__main__":
    sys.exit(main())
