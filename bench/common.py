"""Helpers shared by the benchmark scripts in bench/: machine and source lines, noise, result files.

The scripts import these as ``from common import ...``, which works when run as ``python bench/X.py``
(the script's folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import torch

import loom
from loom.config import Config, load_config
from loom.train.tokenizer import Tokenizer, load_tokenizer

ONE_ROUND = " One round cannot show noise; use --repeats 3 or more."


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


def checkout() -> tuple[str, list[str], str]:
    """Which loom is measured (read-only git): the short commit, the paths changed under src/, and a note
    if loom was imported from somewhere other than this checkout's src/ (else "")."""
    root = Path(__file__).resolve().parents[1]
    package = Path(loom.__file__).resolve().parent
    where = "" if package == root / "src" / "loom" else f" (but loom was imported from {package})"

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *cmd], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return commit, changed, where


def bench_command(script: str) -> str:
    """The command line as ``python bench/<script> <args>``."""
    return f"python bench/{script}" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))


def head_lines(command: str, when: str, machine_line: str) -> list[str]:
    """The Command / Date / Machine lines at the top of a result file."""
    return [f"Command: `{command}`", "", f"Date: {when}", "", f"Machine: {machine_line}", ""]


def noise_head(load_start: float, cores: int, ratios: list[float]) -> str:
    """Start of the noise line: load average at start and now, and the spread of the per-round ratios."""
    return (
        f"Noise: 1-minute load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
        f"({cores} cores); per-round ratios {min(ratios):.3f} to {max(ratios):.3f}"
    )


def busy_warning(spread: float, where: str) -> str:
    """The noise line's ending when rounds disagree by more than ``spread`` at ``where``."""
    return f" -- WARNING: spread above {spread} at {where}; the machine was busy, rerun on a quiet one."


def paired_ratio(loom: object, peer: object, warmup: int) -> float:
    """Median over timed steps of the peer's step time / loom's at the same step (run back to back)."""
    return statistics.median(p / m for m, p in zip(loom.step_s[warmup:], peer.step_s[warmup:], strict=True))


def fmt_bytes(value) -> str:
    """A byte count with thousands separators; one decimal if it is not whole."""
    return f"{float(value):,.0f}" if float(value) == int(value) else f"{float(value):,.1f}"


def fmt_ranks(world: int) -> str:
    """A rank count, marked when it exceeds the cores."""
    return f"{world}{' (oversubscribed)' if world > (os.cpu_count() or 1) else ''}"


def job_config(overrides: list[str]) -> tuple[Config, Tokenizer]:
    """The job's config with the tokenizer's vocabulary filled in, and that tokenizer (not validated)."""
    config = load_config(None, overrides)
    tokenizer = load_tokenizer(config.data.tokenizer)
    config.model.vocab_size = tokenizer.vocab_size
    return config, tokenizer


@dataclass
class StepRecord:
    """One side's per-step record for one round, as one rank saw it: each step's wall and
    process CPU seconds (all threads, the backend's too), the time of each of ``phases`` (set
    by the subclass) and the loss."""

    phases: ClassVar[tuple[str, ...]] = ()
    step_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    phase_s: dict[str, list[float]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def record(self, cpu_s: float, *t: float) -> None:
        """One step: its CPU seconds, then its phase boundaries (the start, then the end of each phase)."""
        self.cpu_s.append(cpu_s)
        self.step_s.append(t[-1] - t[0])
        for name, a, b in zip(self.phases, t[:-1], t[1:], strict=True):
            self.phase_s.setdefault(name, []).append(b - a)

    def median_step_s(self, warmup: int) -> float:
        return statistics.median(self.step_s[warmup:])

    def median_cpu_s(self, warmup: int) -> float:
        return statistics.median(self.cpu_s[warmup:])

    def median_phase_ms(self, warmup: int) -> dict[str, float]:
        return {p: statistics.median(v[warmup:]) * 1e3 for p, v in self.phase_s.items()}


def add_model_args(p: argparse.ArgumentParser, layers: int = 0, d_model: int = 0, layers_help: str = "") -> None:
    """The job's model flags: --preset, --layers, --d-model, --heads (0: the preset's), --seq-len."""
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--layers", type=int, default=layers, help="model.n_layers (0: the preset's)" + layers_help)
    p.add_argument("--d-model", type=int, default=d_model, help="model.d_model (0: the preset's)")
    p.add_argument("--heads", type=int, default=0, help="model.n_heads (0: the preset's)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")


def job_overrides(args: argparse.Namespace, *extra: str) -> list[str]:
    """``--set`` items of a bench job: its preset, steps, sequence and micro-batch, fp32 on the
    CPU, its corpus, ``extra``, then whichever of --layers, --d-model, --heads is not 0."""
    items = [
        f"model.preset={args.preset}",
        f"train.steps={args.steps}",
        f"train.seq_len={args.seq_len}",
        f"train.micro_batch={args.micro_batch}",
        "train.precision=fp32",
        "train.device=cpu",
        f"data.corpus={json.dumps(args.corpus)}",
        *extra,
    ]
    for key, value in (("n_layers", args.layers), ("d_model", args.d_model), ("n_heads", args.heads)):
        if value:
            items.append(f"model.{key}={value}")
    return items


def closing_lines(timing: str, noise: str, notes: list[str], *paragraphs: str) -> list[str]:
    """A result file's end: the timing method, any further ``paragraphs``, the noise line, the notes."""
    lines = [f"Timing: {timing}", ""]
    for text in (*paragraphs, noise, *notes):
        lines += [text, ""]
    return lines


def check_rounds(p: argparse.ArgumentParser, args: argparse.Namespace, extra: int = 2) -> None:
    """Reject --steps below --warmup + extra and --repeats below 1."""
    if args.steps < args.warmup + extra:
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


def write_result(out: Path | None, render) -> None:
    """If ``out`` is set, write ``render(when)`` there (``when``: now, UTC, to the minute) and say so."""
    if out:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(when), encoding="utf-8")
        print(f"wrote {out}")
