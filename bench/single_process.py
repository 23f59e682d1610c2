"""loom's training step against a hand-written PyTorch loop on the same single-process job.

Sides (``common.py`` says how they are timed):

- ``loom``: ``Trainer.train_step``, the step ``loom train`` runs;
- ``plain``: what a user writes by hand with the same parts: set the lr (``lr_at``), cut the
  batch (``batch_offsets`` / ``get_batch``), forward, cross-entropy, backward, clip, torch's
  AdamW with ``build_adamw``'s groups and fused flag (written out here), ``zero_grad``,
  ``loss.item()``; the same model, initial weights and batches;
- ``loom train``: the command, end to end, with the same threads (``--threads``).

Goal: loom train at least 0.98x the plain loop. Check (exit 1 if not): the two sides' losses
agree to 1e-5 at every step.

    python bench/single_process.py --out bench/results/single_process.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    ALONE,
    LOOM_TRAIN,
    TIMING,
    Side,
    TrainerSide,
    add_job_args,
    bench,
    bench_command,
    check_args,
    comparison_table,
    goal_lines,
    job_batches,
    job_items,
    join,
    lr_of,
    noise_line,
    prepare,
    result_head,
    rounds_table,
    run_round,
    tokens_per_step,
    write_result,
)

from loom.model.transformer import Transformer
from loom.optim.adamw import build_adamw

GOAL = 0.98
AGREE_TOL = 1e-5
LOOM, PLAIN = "loom", "plain"


class PlainLoop(Side):
    """A plain PyTorch loop over the same parts."""

    name = PLAIN

    def __init__(self, config, ctx, data) -> None:
        self.config, train = config, config.train
        self.model = Transformer(config.model, seed=train.seed, device=ctx.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train.lr,
            betas=(train.beta1, train.beta2),
            eps=train.eps,
            fused=ctx.device.type in ("cuda", "cpu"),
        )
        _same_as_build_adamw(self.optimizer, build_adamw(self.model, train, ctx.device))
        self.data, self.device = data, ctx.device

    def step(self, k: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_of(self.config, k)
        ((x, y),) = job_batches(self.config, self.data, 1, 0, self.device, steps=[k])[0]
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def _same_as_build_adamw(mine: torch.optim.Optimizer, loom: torch.optim.Optimizer) -> None:
    """The plain loop's AdamW must be the one build_adamw makes: fail before timing if not."""

    def settings(opt: torch.optim.Optimizer) -> tuple:
        return [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]

    if settings(mine) != settings(loom):
        raise SystemExit("the plain loop's AdamW differs from loom.optim.adamw.build_adamw; update PlainLoop to match")


def rank_round(items: list[str], root: str, threads: int, round_index: int, alone: bool) -> dict:
    torch.set_num_threads(threads)
    ctx, config, data = join(items)
    sides = [] if alone else [TrainerSide(LOOM, config, ctx, Path(root) / f"loom-{round_index}")]
    sides.append(PlainLoop(config, ctx, data))
    return run_round(sides, config.train.steps, round_index, alone)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_args(p, steps=40, warmup=5, repeats=5)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per step (grad_accum 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (and loom train's)")
    args = p.parse_args(argv)
    check_args(p, args)
    items = job_items(args, f"train.micro_batch={args.micro_batch}", "train.grad_accum=1")
    config = prepare(items)
    params = Transformer(config.model, seed=config.train.seed, device="meta").num_params()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loom-bench-single-") as root:
        e2e = {LOOM_TRAIN: items}
        result = bench(
            "1 process",
            1,
            tokens_per_step(config, 1),
            rank_round,
            (items, root, args.threads),
            args,
            e2e,
            threads=args.threads,
        )
    job = (
        f"{config.model.preset} ({config.model.family}, {params / 1e6:.2f}M parameters), batch {args.micro_batch} x "
        f"{args.seq_len}, {args.steps} steps ({args.steps - args.warmup} timed) x {args.repeats} rounds, fp32, "
        f"{args.threads} threads"
    )
    diff = result.loss_diff(LOOM, PLAIN)
    ok = diff < AGREE_TOL
    checks = [f"- losses of loom and the plain loop differ by at most {diff:.1e} ({'agree' if ok else 'DIFFER'})."]
    e2e = [] if args.no_e2e else [f"{PLAIN} {ALONE}", LOOM_TRAIN]
    pairs = [(LOOM, PLAIN), *([] if args.no_e2e else [(LOOM_TRAIN, f"{PLAIN} {ALONE}")])]
    sides = [PLAIN, LOOM, *e2e]
    table = comparison_table([result], "job", sides, pairs)
    goals = goal_lines([result], [(a, b, GOAL) for a, b in reversed(pairs)])
    noise = noise_line(load)
    print("\n".join([*table, "", *goals, "", *checks, "", noise]))

    def render(when: str) -> str:
        lines = result_head(
            "Single process: loom vs a plain PyTorch loop", bench_command("single_process.py"), when, job
        )
        lines += [*table, "", "Goals:", "", *goals, "", "Checks:", "", *checks, "", "Per round:", ""]
        lines += [*rounds_table([result], sides), "", f"Timing: {TIMING}", "", noise, ""]
        return "\n".join(lines)

    write_result(args.out, render)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
