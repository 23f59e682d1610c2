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

:class:`Heartbeats` say which peer went silent: each rank's heartbeat thread writes the time,
its host and pid to the job's key-value store (torchrun's) every second; the report names
every rank not heard from for ``SILENT_S`` ("rank 1 (pid 4242 on node-a) silent for 7.3 s").
A rank that gives up waiting also ends silent peers on its own host (a stopped or wedged
process never answers the launcher's SIGTERM, and the restart would wait for it).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from loom.distributed.comm import Ledger
from loom.errors import LoomError

EXIT_HANG = 3  # the watchdog's exit status: a collective waited past the timeout
EXIT_FAILED = 4  # a collective (or the rank's code) raised
RECENT = 20
BEAT_S = 1.0  # how often a rank says it is alive
SILENT_S = 3.0  # a rank not heard from for this long is reported silent


class Heartbeats:
    """Every rank's last sign of life in a key-value store shared by the job (module docstring)."""

    def __init__(self, store: dist.Store, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeats:
        """Beat every BEAT_S on a thread of its own, so a rank busy writing its report, or
        blocked in a collective, still says it is alive; only a dead or stopped one goes silent."""

        def loop() -> None:
            while not self._stop.is_set():
                self.beat()
                self._stop.wait(BEAT_S)

        self._thread = threading.Thread(target=loop, name=f"loom-heartbeat-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @classmethod
    def connect(cls, rank: int, world: int, store: dist.Store | None) -> Heartbeats | None:
        """Heartbeats through ``store`` (this start's keys of the job's store); None without one."""
        return cls(store, rank, world).start() if store is not None else None

    def beat(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.store.set(f"loom/alive/{self.rank}", f"{time.time():.3f} {os.getpid()} {self.host}")

    def silent(self) -> list[tuple[int, float, int, str]]:
        """(rank, seconds since heard, pid, host) of every other rank silent for SILENT_S or never heard."""
        out = []
        now = time.time()
        for rank in range(self.world):
            key = f"loom/alive/{rank}"
            if rank == self.rank:
                continue
            try:
                if not self.store.check([key]):
                    out.append((rank, float("inf"), 0, ""))
                    continue
                when, pid, host = self.store.get(key).decode().split(" ", 2)
            except (RuntimeError, OSError, ValueError):
                return []  # the store itself is gone: nothing to say
            if now - float(when) > SILENT_S:
                out.append((rank, now - float(when), int(pid), host))
        return out

    def describe(self, wait_s: float = SILENT_S + BEAT_S) -> str:
        """Who is silent; a peer that died a moment ago is silent after SILENT_S, so wait up to
        ``wait_s`` for one before saying every peer answers."""
        deadline = time.time() + wait_s
        found = self.silent()
        while not found and time.time() < deadline:
            time.sleep(0.25)
            found = self.silent()
        if not found:
            return "every other rank still answers its heartbeat"
        return "silent: " + ", ".join(
            f"rank {r} (pid {pid} on {host}) for {age:.1f} s" if pid else f"rank {r} (never heard from)"
            for r, age, pid, host in found
        )

    def end_silent_local(self) -> list[int]:
        """SIGKILL the silent ranks on this host (stopped or wedged); the ranks ended."""
        ended = []
        for rank, _, pid, host in self.silent():
            if pid and host == self.host:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    ended.append(rank)
        return ended


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


def write_report(ledger: Ledger, reason: str, run_dir: Path | None, heartbeats: Heartbeats | None = None) -> str:
    """Print the report to stderr and, when a run folder is known, write it there."""
    report = failure_report(ledger, reason)
    if heartbeats is not None:
        report += "\nheartbeats: " + heartbeats.describe()
    print(report, file=sys.stderr, flush=True)
    if run_dir is not None:
        with contextlib.suppress(OSError):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / f"failure_rank{ledger.rank}.txt").write_text(report + "\n", encoding="utf-8")
    return report


class Watchdog:
    """A daemon thread that ends the process when a collective is pending past ``timeout_s``."""

    def __init__(
        self,
        ledger: Ledger,
        timeout_s: float,
        run_dir: Path | None = None,
        poll_s: float = 0.2,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self.ledger, self.heartbeats = ledger, heartbeats
        self.timeout_s = timeout_s
        self.run_dir = run_dir
        self.poll_s = min(poll_s, timeout_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"loom-watchdog-{ledger.rank}", daemon=True)
        self._wakeup: int | None = None  # read end of the pipe SIGTERM is written to (watch_sigterm)
        self.reported = threading.Event()  # a failure was reported: the other path stays quiet
        self._previous: tuple | None = None

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._previous is not None:  # the signal handling as it was
            signal.set_wakeup_fd(self._previous[0])
            signal.signal(signal.SIGTERM, self._previous[1])
            self._previous = None

    def watch_sigterm(self) -> Watchdog:
        """Report before the launcher's SIGTERM ends this rank (it stops every rank when one fails).

        The main thread may be blocked inside a collective, where no Python handler runs; Python's
        C-level handler still writes the signal number to a wake-up pipe from whatever thread gets
        it, and this thread reads it. Call from the main thread, before :meth:`start`.
        """
        if threading.current_thread() is not threading.main_thread():
            return self
        read, write = os.pipe()
        os.set_blocking(write, False)
        os.set_blocking(read, False)
        self._previous = (signal.set_wakeup_fd(write), signal.signal(signal.SIGTERM, lambda *_: None))
        self._wakeup = read
        return self

    def _wait(self) -> bool:
        """Sleep one poll; True when the launcher sent SIGTERM."""
        if self._wakeup is None:
            self._stop.wait(self.poll_s)
            return False
        ready, _, _ = select.select([self._wakeup], [], [], self.poll_s)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            return signal.SIGTERM in os.read(self._wakeup, 64)
        return False

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self._wait() and not self._stop.is_set() and not self.reported.is_set():
                self.reported.set()
                pending = self.ledger.pending()
                doing = f" while in {pending[0].op} #{pending[0].seq}" if pending else ""
                write_report(
                    self.ledger,
                    f"stopped by the launcher (SIGTERM){doing}: another rank failed",
                    self.run_dir,
                    self.heartbeats,
                )
                if self.heartbeats is not None:  # a stopped sibling would hold the launcher up: end it too
                    self.heartbeats.end_silent_local()
                os._exit(EXIT_FAILED)
            now = time.monotonic()
            stuck = [e for e in self.ledger.pending() if now - e.started > self.timeout_s]
            if stuck and not self.reported.is_set():
                self.reported.set()
                oldest = min(stuck, key=lambda e: e.started)
                write_report(
                    self.ledger,
                    f"{oldest.op} #{oldest.seq} did not complete within parallel.timeout_s = {self.timeout_s:g} s "
                    f"(a peer is stuck or gone); stopping this rank",
                    self.run_dir,
                    self.heartbeats,
                )
                if self.heartbeats is not None:  # a stopped peer never answers the launcher: end it here
                    self.heartbeats.end_silent_local()
                os._exit(EXIT_HANG)  # the main thread is blocked inside the collective


@contextlib.contextmanager
def fail_loudly(
    ledger: Ledger, timeout_s: float, run_dir: Path | None, heartbeats: Heartbeats | None = None
) -> Iterator[None]:
    """Run the body under a watchdog; any exception but a user error is reported first.

    A :class:`LoomError` (bad config, damaged checkpoint) is the user's to fix and carries
    its own message; anything else is reported with the ledger and re-raised.
    """
    watchdog = Watchdog(ledger, timeout_s, run_dir, heartbeats=heartbeats).watch_sigterm().start()
    try:
        yield
    except LoomError:
        raise
    except BaseException as exc:
        if not watchdog.reported.is_set():
            watchdog.reported.set()
            write_report(ledger, f"failed with {type(exc).__name__}: {exc}", run_dir, heartbeats)
            if heartbeats is not None:  # a stopped sibling would hold the launcher up: end it
                heartbeats.end_silent_local()
        raise
    finally:
        watchdog.stop()
        if heartbeats is not None:
            heartbeats.stop()
