"""Run metrics: ``RUN_DIR/metrics.jsonl``, TensorBoard scalars, ``summary.json``, progress.

Invariant: metrics.jsonl holds one JSON object per line, each with an int ``step``, and is
flushed after every line, so a crash loses at most the line being written. On resume,
:meth:`MetricsWriter.truncate_after` drops records past the resume step (and hides them in
TensorBoard), so the file stays one record per step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loom.errors import LoomError

if TYPE_CHECKING:  # imported when first used: tensorboard is slow to import and optional per run
    from loom.train.event_file import EventFile

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"


class LoopClock:
    """Each step's share of the training loop's wall time, the time its ``tokens_per_s`` divides.

    :meth:`lap` returns the time since the previous lap (the clock's start, for the first),
    less what ran :meth:`aside` in between (evaluation and checkpoints, which a run schedules
    and reports apart). A step's lap therefore holds everything else the loop does for it:
    ``train_step``, the record's figures and its share of their gathering over the ranks (one
    gather for about a second of steps, whose records are written when it lands), and the
    previous step's progress bar. ``train_step`` alone is the record's ``step_s``, what the
    planner predicts.
    """

    def __init__(self) -> None:
        self._mark = time.perf_counter()
        self._aside = 0.0

    def lap(self) -> float:
        now = time.perf_counter()
        took, self._mark, self._aside = now - self._mark - self._aside, now, 0.0
        return took

    @contextlib.contextmanager
    def aside(self):  # noqa: ANN201
        """Time that no step's lap counts."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._aside += time.perf_counter() - began


class MetricsWriter:
    """Append records to metrics.jsonl and mirror numeric fields to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.tensorboard = tensorboard
        self._purge_step: int | None = None
        self._tb: EventFile | None = None  # made on first log, so that truncate_after can purge
        _drop_torn_tail(self.path)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (held for the run)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold an int ``step``); numpy/torch scalars become numbers."""
        clean = {key: _plain(value, key) for key, value in record.items()}
        step = clean.get("step")
        if type(step) is not int:
            raise ValueError(f"a metrics record needs an int 'step', got {record.get('step')!r}")
        self._append((json.dumps(clean) + "\n").encode())
        if self.tensorboard:  # one event holding every scalar of the step (an event a key: 3.3 ms for 36 keys)
            values = {key: value for key, value in clean.items() if key != "step" and type(value) in (int, float)}
            try:
                self._events().scalars(step, values)
            except OSError as exc:
                raise LoomError(
                    f"could not write {self.run_dir / TENSORBOARD_DIR} ({exc.strerror or exc}); metrics.jsonl holds "
                    f"step {step}, TensorBoard's file ends before it.",
                    "free space in (or permissions on) the run folder, then resume with --resume.",
                ) from None

    def _append(self, line: bytes) -> None:
        """The whole line or nothing: a failed write (a full disk) is cut back off, then reported."""
        start = os.lseek(self._file.fileno(), 0, os.SEEK_END)
        done = 0
        try:
            while done < len(line):
                done += self._file.write(line[done:])
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), start)
            raise LoomError(
                f"could not write {self.path} ({exc.strerror or exc}); the line was taken back, the file is as "
                "it was before this step.",
                "free space in (or permissions on) the run folder, then resume with --resume.",
            ) from None

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` greater than ``step`` (call when resuming from ``step``)."""
        self._file.close()
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        _atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._purge_step = step + 1

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _events(self) -> EventFile:
        if self._tb is None:
            from loom.train.event_file import EventFile

            self._tb = EventFile(self.run_dir / TENSORBOARD_DIR, purge_step=self._purge_step)
            self._purge_step = None
        return self._tb


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run, in file order; a torn last line (crash mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise LoomError(
                f"{path} line {number} is not valid JSON: {line[:80]!r}.",
                "delete or repair that line; every line must be one JSON record.",
            ) from None
    return records


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``RUN_DIR/summary.json`` atomically (temp file, then ``os.replace``)."""
    path = Path(run_dir) / SUMMARY_FILE
    clean = {key: _plain(value, key) for key, value in summary.items()}
    _atomic_write(path, json.dumps(clean, indent=2) + "\n")
    return path


def _plain(value: Any, where: str) -> Any:
    """JSON-ready value: numpy/torch scalars become Python numbers, containers recurse."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {where!r} is a tensor of {value.numel()} elements; log a scalar")
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    raise TypeError(f"metric {where!r} has type {type(value).__name__}, which JSON cannot hold")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (crash mid-write) so the next append starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


# ----------------------------------------------------------------------------- progress


def make_console(stderr: bool = False) -> Console:
    """A rich console; plain text (no colour codes, no live redraw) when not a terminal."""
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class TrainProgress:
    """Progress of the training loop: step/total, loss, tokens/s, lr, elapsed and ETA.

    On a terminal it is a live rich bar. Elsewhere (CI, pytest, a log file) live redraws
    are off and a plain line is printed every ``every`` steps and at the last step.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        console: Console | None = None,
        every: int | None = None,
        live: bool = True,
    ) -> None:
        self.total = total_steps
        self.start = start_step
        self.console = console or make_console()
        self.every = every or max(1, total_steps // 10)
        self.live = live and self.console.is_terminal
        self._started = 0.0
        self._progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> TrainProgress:
        self._started = time.monotonic()
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        stats = f"loss {loss:.4f} | {_si(tokens_per_s)} tok/s | lr {lr:.2e}"
        self._progress.update(self._task, completed=step, stats=stats)
        if not self.live and (step % self.every == 0 or step >= self.total):
            elapsed = time.monotonic() - self._started
            done = step - self.start
            eta = elapsed / done * (self.total - step) if done > 0 else math.nan
            self.console.print(f"step {step}/{self.total} | {stats} | elapsed {_clock(elapsed)} | eta {_clock(eta)}")

    def print(self, *objects: Any) -> None:
        """Print a message above the bar (or as a plain line off-terminal)."""
        self.console.print(*objects)


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def _clock(seconds: float) -> str:
    return "?" if not math.isfinite(seconds) else str(timedelta(seconds=round(seconds)))
