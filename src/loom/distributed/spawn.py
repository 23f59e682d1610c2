"""Run a function on N local ranks, one fresh process each: the multi-process test harness.

``run_ranks(fn, world_size)`` starts ``world_size`` processes with the ``spawn`` start
method, runs ``fn(*args)`` in each and returns the results in rank order. It never hangs
and never leaves a process behind:

- a rank that raises makes the parent raise :class:`RankFailure`, whose message holds the
  full traceback text of every rank that failed (first failure first), so pytest shows it;
- a rank that dies without a result (``os._exit``, a signal, a segfault) is reported with
  its exit code and any fatal-error stack the interpreter dumped;
- after ``timeout_s`` of wall time every rank still running is sent SIGUSR1 (each rank
  dumps its Python stacks), then SIGKILLed with its whole process tree, and the message
  names the ranks that had not finished and shows where they were;
- once one rank has failed, the others get a short grace to report their own errors,
  then are killed;
- each rank leads its own process group (so a process it starts is killed with it) and
  asks Linux to SIGKILL it if the thread that called ``run_ranks`` dies, so even a
  killed pytest leaves no rank behind.

With ``init=True`` (the default) each rank sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and ``MASTER_PORT`` (a free port picked by
the parent), calls ``torch.set_num_threads(1)``, ``dist.init_process_group(backend)``
with a collective timeout a little below the hard one, runs ``fn``, then
``barrier()`` and ``destroy_process_group()``. With ``init=False`` a rank only sets the
environment and the thread count, for code that initialises itself (loom's trainer). Either
way a rank exits with ``os._exit(0)`` once its result is sent: no interpreter teardown, so
a file ``fn`` writes must be closed by ``fn``.
``env`` entries are applied after loom's own, so they can override them.

How tests use it: write the per-rank body as a **module-level** function of the test
module (it is pickled by reference; spawned ranks get the parent's ``sys.path``, so the
test module imports in them), return something picklable, and assert in the parent::

    import torch
    import torch.distributed as dist
    from loom.distributed.spawn import run_ranks

    def _sum_of_ranks(scale):
        t = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(t)
        return t.item() * scale

    def test_all_reduce():
        assert run_ranks(_sum_of_ranks, 3, args=(2.0,), timeout_s=60) == [6.0, 6.0, 6.0]

Starting a rank costs a few seconds (a fresh interpreter importing torch), so do many
checks inside one call rather than one call per check. A script (a benchmark) that calls
``run_ranks`` must do so under ``if __name__ == "__main__":``, as for any ``spawn``
start: each rank re-imports the main module. Ranks write to the parent's
stdout/stderr (pytest's capture shows it for a failing test); stdin is not inherited.
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection, get_context
from typing import Any

__all__ = ["RankFailure", "run_ranks", "free_port"]

# Time the other ranks get to report their own error once one rank has failed.
_FAILURE_GRACE_S = 1.5
# Time a rank gets to dump its stacks (SIGUSR1) before the SIGKILL on timeout.
_STACK_DUMP_WAIT_S = 0.5


class RankFailure(RuntimeError):
    """One or more ranks raised, died or timed out.

    ``failures`` maps rank -> report (traceback text, or exit code and dumped stack);
    ``unfinished`` lists the ranks still running when the hard timeout fired.
    """

    def __init__(self, message: str, failures: dict[int, str], unfinished: list[int]) -> None:
        super().__init__(message)
        self.failures = failures
        self.unfinished = unfinished


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
    init: bool = True,
    collective_timeout_s: float | None = None,
) -> list:
    """Run ``fn(*args)`` on ``world_size`` fresh processes; return each rank's result in rank order.

    Raises :class:`RankFailure` if any rank raises, dies or is still running after
    ``timeout_s`` seconds; every process started is dead when this returns or raises.
    ``collective_timeout_s`` (default: 80% of ``timeout_s``) is the process-group timeout,
    so a rank stuck in a collective raises on its own before the hard kill.
    """
    __tracebackhide__ = True  # pytest: show the ranks' tracebacks, not this function
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        payload = pickle.dumps((fn, tuple(args)))
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise TypeError(
            f"run_ranks could not pickle {fn!r} with its args ({exc}); pass a module-level "
            "function and picklable arguments (no lambdas, closures or local functions)"
        ) from exc
    if collective_timeout_s is None:
        collective_timeout_s = max(1.0, 0.8 * timeout_s)

    ctx = get_context("spawn")
    port = free_port()
    stack_dir = tempfile.mkdtemp(prefix="loom-ranks-")
    procs: list = []
    readers: list = []
    deadline = time.monotonic() + timeout_s
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                args=(
                    rank,
                    world_size,
                    payload,
                    backend,
                    port,
                    dict(env or {}),
                    init,
                    collective_timeout_s,
                    os.path.join(stack_dir, f"rank{rank}.stack"),
                    writer,
                ),
                name=f"loom-rank-{rank}",
            )
            proc.start()
            writer.close()
            procs.append(proc)
            readers.append(reader)
        results, failures, unfinished = _collect(procs, readers, deadline, stack_dir)
    finally:
        for proc in procs:
            _kill_tree(proc)
        for reader in readers:
            reader.close()
        shutil.rmtree(stack_dir, ignore_errors=True)

    if failures or unfinished:
        raise RankFailure(_failure_message(world_size, timeout_s, failures, unfinished), failures, unfinished)
    return results


def _collect(procs: list, readers: list, deadline: float, stack_dir: str):
    """Wait for every rank's message and exit; return (results, failures, unfinished)."""
    n = len(procs)
    results: list = [None] * n
    failures: dict[int, str] = {}
    reported: set[int] = set()  # ranks whose message (result or traceback) arrived
    closed: set[int] = set()  # ranks whose pipe is at end of file
    exited: set[int] = set()
    limit = deadline
    while len(exited) < n:
        now = time.monotonic()
        if now >= limit:
            break
        waitables = [readers[r] for r in range(n) if r not in closed]
        waitables += [procs[r].sentinel for r in range(n) if r not in exited]
        ready = set(connection.wait(waitables, timeout=limit - now))
        for r in range(n):
            if r not in closed and readers[r] in ready:
                _receive(r, readers[r], results, failures, reported, closed)
            if r not in exited and procs[r].sentinel in ready:
                procs[r].join()
                exited.add(r)
                if r not in closed:  # the message may still sit in the pipe
                    _receive(r, readers[r], results, failures, reported, closed)
                code = procs[r].exitcode
                if r not in reported:
                    failures[r] = _death_report(code, stack_dir, r)
                elif r not in failures and code != 0:
                    failures[r] = f"returned a result, then exited with code {code}"
        if failures and limit == deadline:
            limit = min(deadline, time.monotonic() + _FAILURE_GRACE_S)

    running = [r for r in range(n) if r not in exited]
    if not running:
        return results, failures, []
    if failures:
        for r in running:
            failures.setdefault(r, "killed by the harness after another rank failed")
        return results, failures, []
    # Hard timeout: ask the stuck ranks where they are before they are killed.
    for r in running:
        _signal(procs[r].pid, signal.SIGUSR1)
    time.sleep(_STACK_DUMP_WAIT_S)
    for r in running:
        state = "returned a result but had not exited" if r in reported else "still running"
        stack = _read_stack(stack_dir, r)
        failures[r] = f"{state} at the hard timeout" + (f"; its stacks:\n{stack}" if stack else "")
    return results, failures, running


def _receive(rank: int, reader, results: list, failures: dict[int, str], reported: set[int], closed: set[int]) -> None:
    """Read one message from a rank, if any; mark the pipe closed at end of file."""
    if not reader.poll():
        return
    message = _read(reader)
    if message is None:
        closed.add(rank)
        return
    kind, value = message
    if kind == "ok":
        results[rank] = value
    else:
        failures[rank] = value
    reported.add(rank)


def _read(reader) -> tuple[str, Any] | None:
    """One (kind, value) message, or None if the rank closed its end without sending."""
    try:
        return pickle.loads(reader.recv_bytes())
    except (EOFError, OSError):
        return None


def _death_report(exitcode: int | None, stack_dir: str, rank: int) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        text = f"died without a result: killed by {name} (exit code {exitcode})"
    else:
        text = f"died without a result: exit code {exitcode}"
    stack = _read_stack(stack_dir, rank)
    return text + (f"\nfatal-error stack:\n{stack}" if stack else "")


def _read_stack(stack_dir: str, rank: int) -> str:
    try:
        with open(os.path.join(stack_dir, f"rank{rank}.stack"), encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _failure_message(world_size: int, timeout_s: float, failures: dict[int, str], unfinished: list[int]) -> str:
    if unfinished:
        head = (
            f"{len(unfinished)} of {world_size} ranks had not finished after the hard "
            f"timeout of {timeout_s:g} s: ranks {unfinished}"
        )
    else:
        head = f"{len(failures)} of {world_size} ranks failed (first failure first)"
    parts = [head]
    for rank, report in failures.items():
        parts.append(f"----- rank {rank} -----\n{report.rstrip()}")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- cleanup


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is parenthesised and may hold spaces: parse after the last ')'.
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tree(proc) -> None:
    """SIGKILL a rank, its process group and everything below it, then reap it.

    The group is killed even when the rank already exited: a process it started and
    left behind stays in its group (each rank leads its own, see ``_rank_main``).
    """
    if proc.pid is None:
        return
    below = _descendants(proc.pid) if proc.exitcode is None else []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.exitcode is None:
        _signal(proc.pid, signal.SIGKILL)
    for pid in below:
        _signal(pid, signal.SIGKILL)
    proc.join(timeout=10)
    if proc.exitcode is not None:
        proc.close()


# ----------------------------------------------------------------------------- child side


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this rank if the parent dies, so a killed pytest leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _rank_main(
    rank: int,
    world_size: int,
    payload: bytes,
    backend: str,
    port: int,
    env: dict[str, str],
    init: bool,
    collective_timeout_s: float,
    stack_path: str,
    writer,
) -> None:
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    _die_with_parent()
    stack_file = open(stack_path, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the rank
    faulthandler.enable(file=stack_file, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        fn, args = pickle.loads(payload)
        if init:
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=collective_timeout_s),
            )
        result = fn(*args)
        if init and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        try:
            # Plain pickle, not the Connection's: torch's multiprocessing reductions would
            # pass tensors as shared-memory handles that die with this process.
            writer.send_bytes(pickle.dumps(("ok", result)))
        except Exception:  # noqa: BLE001 - an unpicklable result is the rank's failure
            writer.send_bytes(
                pickle.dumps(
                    ("error", "the rank's return value could not be sent to the parent:\n" + traceback.format_exc())
                )
            )
    except BaseException:  # noqa: BLE001 - every failure goes to the parent as text
        try:
            writer.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            # Skip interpreter teardown: a failed rank's process group may block in it.
            os._exit(1)
    finally:
        writer.close()
        sys.stdout.flush()
        sys.stderr.flush()
    # The result is with the parent: skip interpreter teardown, where a native thread the test
    # left running (a backend's worker, an unclosed trainer's) can abort or segfault the exit
    # (seen as "returned a result, then exited with code -11").
    logging.shutdown()
    os._exit(0)
