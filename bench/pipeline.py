"""loom's pipeline schedules against ``torch.distributed.pipelining`` on the same multi-rank job.

Sides, for each schedule and pipeline size pp (``common.py`` says how they are timed):

- ``loom``: ``Trainer.train_step`` with ``parallel.pp``, ``parallel.schedule`` (and
  ``parallel.vp`` for the interleaved schedule): the schedule, the gradient sync with the tied
  embedding's exchange between the first and last stage, the loss shared for the log, AdamW;
- ``torch``: ``torch.distributed.pipelining`` as its users set it up: one ``PipelineStage`` per
  virtual stage, each a ``Transformer(..., layers=<the stage's range>, embed=..., head=...)``
  cut as loom cuts it (``rank_stages``), the paired schedule class (``gpipe`` /
  ``ScheduleGPipe``, ``1f1b`` / ``Schedule1F1B``, ``interleaved_1f1b`` (vp chunks per rank) /
  ``ScheduleInterleaved1F1B``, ``zero_bubble`` (ZB-H1) / ``ScheduleInterleavedZeroBubble`` with
  one stage per rank, which is ZB-H1), the loss ``loss_from_logits`` (torch's ``scale_grads``
  divides the accumulated gradients by the micro-batch count, as loom divides each loss), the
  tied embedding's gradients summed between the first and last rank, the loss sent to the
  other stages for the log (an all-reduce over pp, as loom shares it), AdamW (``build_adamw``);
- ``loom train``: the command, end to end.

Same model and initial weights (layout-independent init), micro-batches, lr and AdamW; no
clipping on either side (``train.grad_clip = 0``). Goal: loom train at least 1.0x torch for
every schedule at pp 2 and 4. Checks (exit 1 if not): the losses agree to 1e-5 over all steps,
and where torch executes a ``pipeline_order`` (interleaved, zero-bubble), loom's compute order
on every rank is the same (GPipe and 1F1B run hand-coded loops: all forwards then all
backwards; min(m, p - r) warm-up forwards, then backward/forward pairs, which are loom's orders).

    python bench/pipeline.py --out bench/results/pipeline.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed.pipelining as pipelining
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
    sizes,
    tokens_per_step,
    write_result,
)
from torch import nn

from loom.model.transformer import Transformer
from loom.optim.adamw import build_adamw
from loom.parallel.pipeline.partition import StagePlan, rank_stages
from loom.parallel.pipeline.rank import add_from_peer
from loom.parallel.pipeline.schedules import stage_of

GOAL = 1.0
AGREE_TOL = 1e-5
LOOM, TORCH = "loom", "torch"
KINDS = ("F", "B", "I", "W")
TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
}


class StageModule(nn.Module):
    """One virtual stage for torch: a ``Transformer`` holding only the stage's layers."""

    def __init__(self, config, plan: StagePlan, device: torch.device) -> None:
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


class TorchPipeline(Side):
    """``torch.distributed.pipelining``: a PipelineStage per virtual stage and the paired schedule class."""

    name = TORCH

    def __init__(self, config, ctx, data, schedule: str) -> None:
        self.config, self.data, self.device = config, data, ctx.device
        self.pp, rank, vp = ctx.comm("pp"), ctx.coords.pp, config.parallel.vp
        self.plans = rank_stages(config.model.n_layers, self.pp.size, vp, rank)
        self.first, self.last = any(p.embed for p in self.plans), any(p.head for p in self.plans)
        self.m = config.batch(dp=1).grad_accum
        self.stage_modules = [StageModule(config, plan, ctx.device) for plan in self.plans]
        stages = [
            pipelining.PipelineStage(mod, plan.stage, self.pp.size * vp, ctx.device, group=self.pp.group)
            for mod, plan in zip(self.stage_modules, self.plans, strict=True)
        ]
        # every rank passes the loss (torch runs the backward only when it has one); only the last stage calls it
        loss_fn = self.stage_modules[-1].model.loss_from_logits
        cls = getattr(pipelining, TORCH_SCHEDULES[schedule])
        single = cls in (pipelining.ScheduleGPipe, pipelining.Schedule1F1B)
        self.schedule = cls(stages[0] if single else stages, self.m, loss_fn=loss_fn)
        # the runtime schedules execute their pipeline_order; GPipe and 1F1B run a hand-coded loop
        order = {} if single else self.schedule.pipeline_order
        self.compute_order = [
            (a.stage_index, a.computation_type.value, a.microbatch_index)
            for a in order.get(rank, [])
            if a is not None and a.computation_type.value in KINDS
        ]
        self.tied = None
        if config.model.tied and self.first != self.last:
            owner = next(mod.model for mod in self.stage_modules if mod.model.tok_emb is not None)
            self.tied = owner.tok_emb.weight
        self.optimizer = build_adamw(nn.ModuleList(self.stage_modules), config.train, ctx.device)

    def step(self, k: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_of(self.config, k)
        micro = job_batches(self.config, self.data, 1, 0, self.device, steps=[k])[0]
        x, y = torch.cat([b[0] for b in micro]), torch.cat([b[1] for b in micro])
        args = (x,) if self.first else ()
        loss = torch.zeros((), device=self.device)
        if self.last:
            losses: list[torch.Tensor] = []
            self.schedule.step(*args, target=y, losses=losses, return_outputs=False)
            loss = torch.stack(losses).mean().detach()
        else:
            self.schedule.step(*args, return_outputs=False)
        if self.tied is not None:
            add_from_peer(self.pp, self.tied.grad, self.pp.size - 1 if self.first else 0)
        torch.distributed.all_reduce(loss, group=self.pp.group)  # the log's loss on every stage, as loom's
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def rank_round(items: list[str], root: str, schedule: str, round_index: int, alone: bool) -> dict:
    ctx, config, data = join(items)
    peer = TorchPipeline(config, ctx, data, schedule)
    if alone:
        return run_round([peer], config.train.steps, round_index, alone)
    loom = TrainerSide(LOOM, config, ctx, Path(root) / f"{schedule}-{round_index}")
    rank, pp = ctx.coords.pp, ctx.dims.pp
    mine = [
        (stage_of(rank, a.chunk, pp), a.kind, a.microbatch) for a in loom.trainer.pipeline.actions if a.kind in KINDS
    ]
    same = None if not peer.compute_order else mine == peer.compute_order
    runs = run_round([loom, peer], config.train.steps, round_index)
    flag = torch.tensor([0.0 if same is False else 1.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)  # every rank's order, on rank 0
    runs[LOOM].facts["same_order"] = None if same is None else bool(flag.item())
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_args(p, layers=8, steps=16, warmup=3, repeats=4)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (a multiple of every pp)")
    p.add_argument("--vp", type=int, default=2, help="chunks per rank for interleaved_1f1b")
    p.add_argument("--pp", default="2,4", help="comma-separated pipeline sizes")
    p.add_argument("--schedules", default=",".join(TORCH_SCHEDULES), help="comma-separated loom schedule names")
    args = p.parse_args(argv)
    check_args(p, args)
    pps = sizes(p, "--pp", args.pp, "size")
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    if not schedules or any(s not in TORCH_SCHEDULES for s in schedules):
        p.error(f"--schedules {args.schedules!r}: use some of {', '.join(TORCH_SCHEDULES)}")
    base = job_items(
        args, f"train.micro_batch={args.micro_batch}", f"train.microbatches={args.microbatches}", "train.grad_clip=0"
    )
    config = prepare(base)
    psi = Transformer(config.model, seed=config.train.seed, device="meta").num_params()
    load = os.getloadavg()[0]
    results, orders = [], []
    with tempfile.TemporaryDirectory(prefix="loom-bench-pp-") as root:
        for pp in pps:
            for schedule in schedules:
                vp = args.vp if schedule == "interleaved_1f1b" else 1
                items = [*base, f"parallel.pp={pp}", f"parallel.schedule={schedule}", f"parallel.vp={vp}"]
                prepare(items)  # the layout is valid before any rank starts
                label = f"pp {pp} {schedule}" + (f" (vp {vp})" if vp > 1 else "")
                e2e = {LOOM_TRAIN: items}
                r = bench(label, pp, tokens_per_step(config, 1), rank_round, (items, root, schedule), args, e2e)
                results.append(r)
                orders.append({f.get("same_order") for f in r.facts[LOOM]})

    model = config.model
    job = (
        f"{model.preset} ({model.family}, {model.n_layers} layers, d_model {model.d_model}, {psi / 1e6:.2f}M "
        f"parameters, tied embeddings: {model.tied}), {args.microbatches} micro-batches of {args.micro_batch} x "
        f"{args.seq_len} tokens per step, {args.steps} steps ({args.steps - args.warmup} timed) x {args.repeats} "
        "rounds, fp32, no clipping, gloo, 1 thread per rank"
    )
    ok, checks = True, []
    for r, order in zip(results, orders, strict=True):
        diff = r.loss_diff(LOOM, TORCH)
        same = (
            "not checked (torch runs a hand-coded loop)"
            if order == {None}
            else ("the same as torch's" if order == {True} else "DIFFERENT from torch's")
        )
        good = diff < AGREE_TOL and False not in order
        ok &= good
        checks.append(f"- {r.label}: losses differ by at most {diff:.1e}; loom's compute order {same}.")
    alone = f"{TORCH} {ALONE}"
    pairs = [(LOOM, TORCH), *([] if args.no_e2e else [(LOOM_TRAIN, alone)])]
    sides = [TORCH, LOOM, *([] if args.no_e2e else [alone, LOOM_TRAIN])]
    table = comparison_table(results, "pp, schedule", sides, pairs)
    goals = goal_lines(results, [(a, b, GOAL) for a, b in reversed(pairs)])
    noise = noise_line(load)
    print("\n".join([*table, "", *goals, "", *checks, "", noise]))

    def render(when: str) -> str:
        title = "Pipeline: loom vs torch.distributed.pipelining"
        lines = result_head(title, bench_command("pipeline.py"), when, job)
        lines += [*table, "", "Goals:", "", *goals, "", "Checks:", "", *checks, "", "Per round:", ""]
        lines += [*rounds_table(results, sides), "", f"Timing: {TIMING}", "", noise, ""]
        return "\n".join(lines)

    write_result(args.out, render)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
