"""Never hang: turn a stuck or failed collective into a message on every surviving rank.

Two paths lead to the same report:

- the collective raises (a peer died and its socket closed, or the backend's own
  timeout fired): :func:`fail_loudly` catches the exception;
- the collective simply never returns: a :class:`Watchdog` thread sees in the ledger
  that it has been pending longer than ``timeout_s`` and ends the process itself.

Either way the rank prints, and writes to ``RUN_DIR/failure_rank{r}.txt``, what it was
waiting for and what it did last ("rank 3: waiting in all_reduce #57 on dp group
[1, 3] for 30.0 s; last completed: reduce_scatter #56 ...") plus its recent ledger
entries, then exits non-zero. The launcher then stops the remaining ranks.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from loom.distributed.comm import Ledger
from loom.errors import LoomError

EXIT_HANG = 3  # the watchdog's exit status: a collective waited past the timeout
EXIT_FAILED = 4  # a collective (or the rank's code) raised
RECENT = 20


def failure_report(ledger: Ledger, reason: str) -> str:
    """The diagnosis: the reason, where this rank is waiting, and its last ledger entries."""
    lines = [f"rank {ledger.rank}: {reason}", ledger.describe(), f"last {RECENT} ledger entries (oldest first):"]
    for entry in ledger.recent(RECENT):
        state = "pending" if entry.finished is None else f"{entry.finished - entry.started:.3f} s"
        lines.append(
            f"  #{entry.seq} {entry.op} on {entry.group} group {list(entry.ranks)}: {entry.numel} x {entry.dtype}, "
            f"{entry.bytes_sent} bytes sent, {state}"
            + (f", tag {entry.tag}" if entry.tag else "")
            + (f" ({entry.note})" if entry.note else "")
        )
    return "\n".join(lines)


def write_report(ledger: Ledger, reason: str, run_dir: Path | None) -> str:
    """Print the report to stderr and, when a run folder is known, write it there."""
    report = failure_report(ledger, reason)
    print(report, file=sys.stderr, flush=True)
    if run_dir is not None:
        with contextlib.suppress(OSError):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / f"failure_rank{ledger.rank}.txt").write_text(report + "\n", encoding="utf-8")
    return report


class Watchdog:
    """A daemon thread that ends the process when a collective is pending past ``timeout_s``."""

    def __init__(self, ledger: Ledger, timeout_s: float, run_dir: Path | None = None, poll_s: float = 0.2) -> None:
        self.ledger = ledger
        self.timeout_s = timeout_s
        self.run_dir = run_dir
        self.poll_s = min(poll_s, timeout_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"loom-watchdog-{ledger.rank}", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            stuck = [e for e in self.ledger.pending() if now - e.started > self.timeout_s]
            if stuck:
                oldest = min(stuck, key=lambda e: e.started)
                write_report(
                    self.ledger,
                    f"{oldest.op} #{oldest.seq} did not complete within parallel.timeout_s = {self.timeout_s:g} s "
                    f"(a peer is stuck or gone); stopping this rank",
                    self.run_dir,
                )
                os._exit(EXIT_HANG)  # the main thread is blocked inside the collective


@contextlib.contextmanager
def fail_loudly(ledger: Ledger, timeout_s: float, run_dir: Path | None) -> Iterator[None]:
    """Run the body under a watchdog; any exception but a user error is reported first.

    A :class:`LoomError` (bad config, damaged checkpoint) is the user's to fix and carries
    its own message; anything else is reported with the ledger and re-raised.
    """
    watchdog = Watchdog(ledger, timeout_s, run_dir).start()
    try:
        yield
    except LoomError:
        raise
    except BaseException as exc:
        write_report(ledger, f"failed with {type(exc).__name__}: {exc}", run_dir)
        raise
    finally:
        watchdog.stop()
