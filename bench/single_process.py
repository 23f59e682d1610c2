"""loom's Trainer against a hand-written PyTorch loop on the same single-process job.

Both sides train the same model (``Transformer`` from one config and seed, so the weights
start identical) on the same batches (``batch_offsets``/``get_batch`` on the same prepared
token arrays) with the same optimizer (torch's AdamW, the param groups and fused flag of
``build_adamw``), the same lr schedule (``lr_at``) and the same gradient clipping.

Timing. Every step's start time is recorded on both sides (loom: by wrapping
``Trainer.train_step`` on the instance, which ``Trainer.run`` calls each step). The timed
window runs from the start of step ``warmup`` to the start of the last step, so it holds
``steps - warmup - 1`` whole loop iterations: for loom that is ``train_step`` plus the
trainer's per-step bookkeeping (metrics.jsonl, TensorBoard scalars, progress). One-time
work is outside the window on both sides: building data, model and optimizer; loom's
TensorBoard import on the first log (a warm-up step); loom's final evaluation and
checkpoint (after the last step starts).

Noise. Rounds are interleaved, and the side that goes first alternates (plain, loom |
loom, plain | ...); the table reports the median tokens/s of each side over the rounds
and the ratio of the medians. When the per-round ratios differ by more than 0.05 the
result is flagged as noise; the ratio of each side's median step time is printed as a
cross-check that one slow burst cannot move.

    python bench/single_process.py --out bench/results/single_process.md
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ONE_ROUND, check_rounds, head_lines, machine, noise_head, write_result
from rich.console import Console

from loom.config import Config, TrainConfig, load_config
from loom.errors import LoomError
from loom.model.transformer import Transformer
from loom.optim.adamw import build_adamw
from loom.optim.lr import lr_at
from loom.train.batches import batch_offsets, get_batch
from loom.train.data import TokenData, prepare_dataset
from loom.train.precision import resolve_device
from loom.train.tokenizer import load_tokenizer
from loom.train.trainer import TRAIN_STREAM, Trainer

GOAL = 0.97  # loom / plain tokens/s at or above this: the trainer costs nothing measurable
AGREE_TOL = 1e-5  # max |loss_loom - loss_plain| over all steps for "agree"
NOISY_SPREAD = 0.05  # per-round ratios further apart than this: the machine was busy


@dataclass
class Run:
    """One side's timings and losses for one round."""

    starts: list[float]  # perf_counter at the start of each step
    losses: list[float]
    step_s: list[float]  # wall time of the step itself (loom: train_step only)

    def tokens_per_s(self, warmup: int, tokens_per_step: int) -> float:
        n = len(self.starts) - 1 - warmup
        return n * tokens_per_step / (self.starts[-1] - self.starts[warmup])

    def loop_s(self, warmup: int) -> float:
        """Mean seconds per loop iteration in the timed window."""
        return (self.starts[-1] - self.starts[warmup]) / (len(self.starts) - 1 - warmup)

    def median_loop_s(self, warmup: int) -> float:
        """Median seconds per loop iteration in the timed window: robust to a burst of noise."""
        window = self.starts[warmup:]
        return statistics.median(b - a for a, b in zip(window, window[1:]))

    def step_only_s(self, warmup: int) -> float:
        """Mean seconds of the step itself in the timed window (loop minus bookkeeping)."""
        return statistics.fmean(self.step_s[warmup:-1])


# ----------------------------------------------------------------------------- the two sides


def plain_adamw(model: torch.nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW as written by hand: decay on matrices, none on vectors; fused on CPU and CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        eps=train.eps,
        fused=device.type in ("cuda", "cpu"),
    )


def run_plain(config: Config, data: TokenData) -> Run:
    """What a user writes by hand: set lr, forward, loss, backward, clip, step, zero_grad, item."""
    train = config.train
    device = resolve_device(train.device)
    model = Transformer(config.model, seed=train.seed, device=device)
    optimizer = plain_adamw(model, train, device)
    batch = train.micro_batch
    starts, losses, step_s = [], [], []
    for step in range(train.steps):
        began = time.perf_counter()
        starts.append(began)
        lr = lr_at(step, train.lr, train.warmup_steps, train.steps, train.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = batch_offsets(len(data.train), train.seq_len, batch, train.seed, step, TRAIN_STREAM)
        x, y = get_batch(data.train, train.seq_len, offsets, device)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - began)
    return Run(starts, losses, step_s)


def run_loom(config: Config) -> Run:
    """``Trainer.run()`` in a temporary run folder, quiet, with each ``train_step`` call timed."""
    starts, losses, step_s = [], [], []
    with tempfile.TemporaryDirectory(prefix="loom-bench-") as run_dir:
        trainer = Trainer(config, Path(run_dir), console=Console(file=io.StringIO()), live_progress=False)
        inner = trainer.train_step

        def timed_step(step: int):
            began = time.perf_counter()
            starts.append(began)
            result = inner(step)
            step_s.append(time.perf_counter() - began)
            losses.append(result.loss)
            return result

        trainer.train_step = timed_step
        trainer.run()
        del trainer
    return Run(starts, losses, step_s)


def check_same_optimizer(config: Config) -> None:
    """The plain loop's AdamW must equal the one ``build_adamw`` makes; fail before timing if not."""
    device = resolve_device(config.train.device)
    model = Transformer(config.model, seed=config.train.seed, device=device)

    def settings(opt: torch.optim.Optimizer) -> tuple:
        groups = [
            ([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups
        ]
        return groups, opt.defaults

    if settings(plain_adamw(model, config.train, device)) != settings(build_adamw(model, config.train, device)):
        raise SystemExit(
            "the plain loop's AdamW differs from loom.optim.adamw.build_adamw; update plain_adamw to match."
        )


# ----------------------------------------------------------------------------- report


def markdown(command: str, when: str, job: str, rows: list[tuple], summary: dict, note: str, noise: str) -> str:
    lines = [
        "# single process: loom Trainer vs a plain PyTorch loop",
        "",
        *head_lines(command, when, machine(gpu=True)),
        "| job | plain tokens/s | loom tokens/s | ratio (loom / plain) | loss max abs diff |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| {job} | {summary['plain']:,.0f} | {summary['loom']:,.0f} | {summary['ratio']:.3f} "
        f"| {summary['diff']:.1e} ({summary['verdict']}) |",
        "",
        "Per round (medians above):",
        "",
        "| round | order | plain tokens/s | loom tokens/s | ratio | loom step-only ms | loom bookkeeping ms/step |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rnd, order, plain, loom, ratio, step_only, bookkeeping in rows:
        lines.append(
            f"| {rnd} | {order} | {plain:,.0f} | {loom:,.0f} | {ratio:.3f} "
            f"| {step_only * 1e3:.2f} | {bookkeeping * 1e3:.3f} |"
        )
    lines += ["", f"Timing: {TIMING}", "", noise, "", note, ""]
    return "\n".join(lines)


TIMING = (
    "tokens/s over whole loop iterations from the start of step `warmup` to the start of the last step, "
    "on both sides; one-time setup (data, model, optimizer), loom's TensorBoard import (warm-up step) "
    "and loom's final eval and checkpoint are excluded from both."
)


# ----------------------------------------------------------------------------- main


def build_config(args: argparse.Namespace) -> Config:
    overrides = [
        f"model.preset={args.preset}",
        f"train.steps={args.steps}",
        f"train.seq_len={args.seq_len}",
        f"train.micro_batch={args.micro_batch}",
        "train.grad_accum=1",
        "train.precision=fp32",
        "train.ckpt_every=0",
        "train.eval_every=0",
        "train.sample_tokens=0",
        f"data.corpus={args.corpus}",
    ]
    config = load_config(None, overrides)
    tokenizer = load_tokenizer(config.data.tokenizer)
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer.vocab_size
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per step (grad_accum 1)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of (plain, loom)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--corpus", default="stdlib", help="data.corpus")
    p.add_argument("--out", type=Path, help="also write the result as markdown here")
    args = p.parse_args(argv)
    check_rounds(p, args, extra=3)
    return args


@dataclass
class Round:
    order: str
    plain: Run
    loom: Run


def run_rounds(config: Config, data: TokenData, repeats: int, tokens_per_step: int, warmup: int) -> list[Round]:
    """Interleaved rounds; odd rounds run plain first, even rounds loom first."""
    print(
        f"{'round':>5}  {'order':<11}  {'plain tok/s':>11}  {'loom tok/s':>10}  {'ratio':>6}  "
        f"{'loom step ms':>12}  {'bookkeeping ms':>14}  {'loss diff':>9}"
    )
    rounds = []
    for r in range(1, repeats + 1):
        order = ("plain", "loom") if r % 2 else ("loom", "plain")
        runs = {}
        for side in order:
            gc.collect()
            runs[side] = run_plain(copy.deepcopy(config), data) if side == "plain" else run_loom(copy.deepcopy(config))
        rnd = Round(", ".join(order), runs["plain"], runs["loom"])
        rounds.append(rnd)
        row = round_row(r, rnd, tokens_per_step, warmup)
        print(
            f"{r:>5}  {row[1]:<11}  {row[2]:>11,.0f}  {row[3]:>10,.0f}  {row[4]:>6.3f}  "
            f"{row[5] * 1e3:>12.2f}  {row[6] * 1e3:>14.3f}  {loss_diff(rnd):>9.1e}"
        )
    return rounds


def round_row(r: int, rnd: Round, tokens_per_step: int, warmup: int) -> tuple:
    """(round, order, plain tok/s, loom tok/s, ratio, loom step-only s, loom bookkeeping s/step)."""
    plain, loom = rnd.plain.tokens_per_s(warmup, tokens_per_step), rnd.loom.tokens_per_s(warmup, tokens_per_step)
    step_only = rnd.loom.step_only_s(warmup)
    return r, rnd.order, plain, loom, loom / plain, step_only, rnd.loom.loop_s(warmup) - step_only


def loss_diff(rnd: Round) -> float:
    return max(abs(a - b) for a, b in zip(rnd.plain.losses, rnd.loom.losses, strict=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        config = build_config(args)
        data = prepare_dataset(config.data, load_tokenizer(config.data.tokenizer), log=print)
    except LoomError as exc:
        print(exc, file=sys.stderr)
        return 2
    check_same_optimizer(config)
    train = config.train
    tokens_per_step = train.micro_batch * train.seq_len
    params = Transformer(config.model, seed=train.seed).num_params()
    job = (
        f"{args.preset} ({config.model.family}, {params / 1e6:.2f}M params), batch {train.micro_batch} x "
        f"{train.seq_len}, {train.steps} steps ({train.steps - args.warmup - 1} timed), fp32, threads={args.threads}"
    )
    print(f"job: {job}\ntiming: {TIMING}\n")

    load_start = os.getloadavg()[0]
    rounds = run_rounds(config, data, args.repeats, tokens_per_step, args.warmup)
    rows = [round_row(r, rnd, tokens_per_step, args.warmup) for r, rnd in enumerate(rounds, start=1)]
    med_plain, med_loom = statistics.median(row[2] for row in rows), statistics.median(row[3] for row in rows)
    ratio = med_loom / med_plain
    diff = max(loss_diff(rnd) for rnd in rounds)
    verdict = "agree" if diff < AGREE_TOL else "DIFFER"
    summary = {"plain": med_plain, "loom": med_loom, "ratio": ratio, "diff": diff, "verdict": verdict}

    ratios = [row[4] for row in rows]
    noisy = max(ratios) - min(ratios) > NOISY_SPREAD
    median_ratio = statistics.median(rnd.plain.median_loop_s(args.warmup) for rnd in rounds) / statistics.median(
        rnd.loom.median_loop_s(args.warmup) for rnd in rounds
    )
    noise = (
        noise_head(load_start, os.cpu_count(), ratios) + "; "
        f"the ratio from each side's median step time instead of the sum: {median_ratio:.3f}."
        + (
            f" WARNING: the rounds disagree by more than {NOISY_SPREAD}: the machine was busy; rerun on a quiet one."
            if noisy
            else ""
        )
        + (ONE_ROUND if len(rounds) == 1 else "")
    )
    bookkeeping_ms = statistics.median(row[6] for row in rows) * 1e3
    loop_ms = tokens_per_step / med_loom * 1e3
    goal = "meets" if ratio >= GOAL else "misses"
    note = (
        f"Interpretation: loom runs at {ratio:.3f}x the plain loop's tokens/s ({goal} the {GOAL} goal"
        f"{'; noisy, see above' if noisy else ''}); its per-step bookkeeping (metrics.jsonl, TensorBoard, progress) "
        f"takes {bookkeeping_ms:.2f} ms of a {loop_ms:.1f} ms step ({bookkeeping_ms / loop_ms:.1%}), and the loss "
        f"curves {verdict} (max abs diff {diff:.1e} over {train.steps} steps in each of {args.repeats} rounds)."
    )

    print(f"\njob: {job}")
    print(f"plain tokens/s (median of {args.repeats}): {med_plain:,.0f}")
    print(f"loom  tokens/s (median of {args.repeats}): {med_loom:,.0f}")
    print(f"ratio loom / plain: {ratio:.3f}  (goal >= {GOAL})")
    print(f"loss max abs diff: {diff:.1e}  ({verdict}, tolerance {AGREE_TOL:g})")
    print(noise)
    print(note)
    write_result(args.out, lambda when: markdown(command_line(), when, job, rows, summary, note, noise))
    return 0 if verdict == "agree" else 1


def command_line() -> str:
    """The command as typed, with the interpreter as a path relative to here when it is inside."""
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        exe = Path("python")
    return shlex.join([str(exe), *sys.argv])


if __name__ == "__main__":
    sys.exit(main())
