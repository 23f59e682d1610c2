"""A run's steps under ``torch.profiler``: ``train.profile_start``, ``train.profile_steps``.

Steps ``profile_start .. profile_start + profile_steps - 1`` (numbered from 1, as the metrics
number them; 0 turns profiling off) run under :class:`torch.profiler.profile` on rank 0, or on
every rank with ``train.profile_all_ranks``. After the last of them (or when the run stops
before it) each profiled rank writes into ``RUN_DIR/profile/``:

- ``trace_rank{r}.json``: the Chrome trace (open it in Perfetto or chrome://tracing), CPU
  operators and, on CUDA, kernels; the phases of loom's step are named ranges in it
  (:data:`PHASES`), and in a pipeline each action of the schedule (``loom.pp.F mb0 chunk0``,
  ``B``, ``I``, ``W``, the sends and receives), so a slow step shows which phase holds the time;
- ``ops_rank{r}.txt``: the operators by self time (device time on a GPU), the table
  ``key_averages`` prints.

The profiler costs time (each operator is recorded), so the profiled steps' metrics records
carry ``"profiled": true``: their ``tokens_per_s`` is not the run's speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

PROFILE_DIR = "profile"
PHASES = ("loom.forward", "loom.backward", "loom.pipeline", "loom.sync_gradients", "loom.clip", "loom.update")
TOP_OPS = 30  # rows of ops_rank{r}.txt


class StepProfiler:
    """Starts ``torch.profiler`` before step ``start`` and stops it after ``steps`` steps, on a
    rank that profiles (``here``); :meth:`span` names a phase of the step while it records.
    Off (``start`` 0 or not ``here``): every method is a no-op."""

    def __init__(
        self, start: int, steps: int, run_dir: Path, rank: int, here: bool, cuda: bool, log: Callable[[str], None]
    ) -> None:
        self.start, self.stop_after = start, start + steps - 1
        self.run_dir, self.rank, self.here, self.cuda, self.log = Path(run_dir), rank, here and start > 0, cuda, log
        self.profiler: profile | None = None
        self.profiled: list[int] = []

    @property
    def active(self) -> bool:
        return self.profiler is not None

    def begin(self, step: int) -> None:
        """Before step ``step`` (1-based): the profiler starts at ``start``."""
        if self.here and step == self.start:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()

    def end(self, step: int) -> bool:
        """After step ``step``: whether it ran under the profiler (the last one stops it and writes)."""
        if not self.active:
            return False
        self.profiled.append(step)
        if step >= self.stop_after:
            self.close()
        return True

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """A named range of the trace while the profiler records (one of :data:`PHASES`)."""
        if self.profiler is None:
            yield
            return
        with record_function(name):
            yield

    def action_span(self) -> Callable[[str], contextlib.AbstractContextManager] | None:
        """A pipeline's per-action ranges (``loom.pp.F mb0 chunk0``, ...) while recording, else None."""
        return self.span if self.profiler is not None else None

    def close(self) -> None:
        """Stop the profiler (if it runs) and write the trace and the operator table. A run stopped
        inside the range writes what it recorded (its last step marked unfinished). Diagnostics
        never end a run or hide its error: a profile that cannot be written is reported, not raised."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        first = self.profiled[0] if self.profiled else self.start
        steps = f"steps {first}-{self.profiled[-1]}" if self.profiled else f"step {first} (unfinished)"
        try:
            profiler.stop()
            out = self.run_dir / PROFILE_DIR
            out.mkdir(parents=True, exist_ok=True)
            trace = out / f"trace_rank{self.rank}.json"
            profiler.export_chrome_trace(str(trace))
            order = "self_device_time_total" if self.cuda else "self_cpu_time_total"
            table = profiler.key_averages().table(sort_by=order, row_limit=TOP_OPS)
            head = f"rank {self.rank}, {steps}: operators by {order.replace('_', ' ')}\n"
            (out / f"ops_rank{self.rank}.txt").write_text(head + table + "\n", encoding="utf-8")
        except (OSError, RuntimeError) as exc:
            self.log(f"could not write the profile of {steps} on rank {self.rank}: {exc}")
            return
        self.log(f"profiled {steps} on rank {self.rank}: {trace} (Perfetto, chrome://tracing)")
