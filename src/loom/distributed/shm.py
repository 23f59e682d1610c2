"""Sum all-reduce through shared memory, for the ranks of a group that share one host.

On one host, gloo moves every byte of an all-reduce through TCP on the loopback device:
two kernel copies per byte and per hop, and the CPU time of the socket layer, on the same
cores that run the model. Ranks of one host can instead read each other's memory. Each
rank of the group owns one segment in ``/dev/shm`` (a control word, then ``numel`` data
elements) and maps its peers' segments. An all-reduce of the region ``[offset, offset +
numel)`` of every rank's data is then, for rank r of n, with chunk c the c-th of n
near-equal pieces of the region:

1. ready: r says its region is final, and waits until every peer has said so;
2. reduce-scatter: r adds chunk r of every peer's region into chunk r of its own
   (each chunk is summed by exactly one rank, so every rank ends with the same bits);
3. reduced: r says so, and waits for every peer;
4. all-gather: r copies chunk c of rank c's region into chunk c of its own, for c != r;
5. gathered: r says so. Its peers may still be copying r's chunk r; :meth:`quiesce`
   waits until every peer has said "gathered" before r's region may change again.

Each rank reads (n-1)/n of the region in step 2 and again in step 4: 2(n-1)/n x S bytes
cross between processes, as a ring all-reduce sends, and the ledger records the call as an
``all_reduce`` with that byte count (note "shm"). The control words are not data and are
not counted.

The steps run on one worker thread, in launch order (the same on every rank), so backward
goes on while a bucket is being reduced. The control word is a counter, 3 per call. A rank
that says something also rings each peer's doorbell (a byte into the peer's FIFO); a rank
that waits reads its peers' counters, briefly, then sleeps in ``select`` on its own
doorbell, so a waiting rank gives its core away, which matters when ranks outnumber cores.
Ordering relies on x86-64's total store order (data is stored before the counter
that announces it, and read after it), so :func:`unavailable` declines other CPUs; it also
declines ranks on different hosts, non-CPU devices and a ``/dev/shm`` too small to hold
the segments. A peer that stops advancing (dead, or stuck) makes the waiting call raise
after ``timeout_s``; the watchdog reports the pending ledger entry before that. :meth:`quiesce`
(peers still reading this rank's data after its calls are done) has no ledger entry for the
watchdog to see, so it raises after its own ``quiesce_timeout_s``: set it to the watchdog's
timeout, or a stopped peer there holds its group for the whole ``timeout_s``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import queue
import select
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import torch

from loom.distributed.comm import Comm, Handle
from loom.distributed.ledger import exact_bytes

SHM_DIR = Path("/dev/shm")
CONTROL_BYTES = 64  # one int64 counter, padded to a cache line so the data stays aligned
_SPIN = 20  # counter reads before sleeping on the doorbell (each holds the GIL for about a microsecond)


def unavailable(comm: Comm, device: torch.device, nbytes: int) -> str | None:
    """Why the shared-memory all-reduce cannot serve ``comm`` (None: it can).

    Collective over ``comm``, and every rank gets the same answer: one all-reduce compares
    the ranks' hosts and whether each can use it.
    """
    if device.type != "cpu":  # the same on every rank of a group
        return f"the gradients live on {device.type}, not in host memory"
    reason = None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        reason = f"its ordering needs x86-64's stores, this CPU is {platform.machine()}"
    elif not SHM_DIR.is_dir():
        reason = f"{SHM_DIR} does not exist"
    elif (free := shutil.disk_usage(SHM_DIR).free) < 2 * comm.size * (nbytes + CONTROL_BYTES):  # with room to spare
        reason = (
            f"{SHM_DIR} has {free / 2**20:.0f} MiB free, the segments need {2 * comm.size * nbytes / 2**20:.0f} MiB"
        )
    digest = hashlib.sha256(f"{socket.gethostname()}:{_boot_id()}".encode()).digest()
    host = int.from_bytes(digest[:7], "little")
    votes = torch.tensor([host, -host, int(reason is not None)], dtype=torch.int64)
    comm.all_reduce(votes, op="max", tag="shm-setup")  # largest and smallest host id, any rank refusing
    if votes[0] != -votes[1]:
        return "the group's ranks are on different hosts"
    if votes[2]:
        return reason or "another rank of the group cannot use it"
    return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class _Work:
    """One call in flight on the worker: ``wait`` blocks until it is done, re-raising its error."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> bool:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return True


class ShmAllReduce:
    """Asynchronous sum all-reduces over regions of ``numel`` shared elements per rank.

    ``buffer`` is this rank's data (a flat tensor in shared memory): put what is to be
    reduced there, call :meth:`all_reduce` on a region, and after the handle's ``wait`` the
    region holds the sum over the group. Collective to build (every rank of ``comm``).
    """

    def __init__(
        self,
        comm: Comm,
        numel: int,
        dtype: torch.dtype,
        timeout_s: float = 300.0,
        quiesce_timeout_s: float | None = None,
    ) -> None:
        self.comm, self.timeout_s = comm, timeout_s
        self.quiesce_timeout_s = timeout_s if quiesce_timeout_s is None else quiesce_timeout_s
        self.rank, self.size = comm.rank, comm.size
        self.element_size = torch.empty((), dtype=dtype).element_size()
        nbytes = CONTROL_BYTES + numel * self.element_size
        name = torch.tensor(list(uuid.uuid4().bytes), dtype=torch.uint8)
        comm.broadcast(name, src=0, tag="shm-setup")  # one name per group, from its first rank
        stem = f"loom-{bytes(name.tolist()).hex()}"
        paths = [SHM_DIR / f"{stem}-{r}" for r in range(self.size)]
        doorbells = [SHM_DIR / f"{stem}-{r}.bell" for r in range(self.size)]
        mine = paths[self.rank]
        with open(mine, "wb") as f:
            f.truncate(nbytes)
        os.mkfifo(doorbells[self.rank])
        # a reader must hold a FIFO open before a writer may open it without blocking
        self._inbox = os.open(doorbells[self.rank], os.O_RDONLY | os.O_NONBLOCK)
        comm.barrier()  # every segment and doorbell exists
        try:
            storages = [torch.UntypedStorage.from_file(str(p), shared=True, nbytes=nbytes) for p in paths]
            self._bells = [os.open(d, os.O_WRONLY | os.O_NONBLOCK) for q, d in enumerate(doorbells) if q != self.rank]
        finally:
            comm.barrier()  # every rank has mapped every segment: the names can go
            mine.unlink(missing_ok=True)
            doorbells[self.rank].unlink(missing_ok=True)
        whole = [torch.empty(0, dtype=torch.uint8).set_(s) for s in storages]
        self._counters = [w[:CONTROL_BYTES].view(torch.int64) for w in whole]
        self._data = [w[CONTROL_BYTES:].view(dtype) for w in whole]
        self._said = 0  # this rank's counter value (the worker's copy)
        self._closed = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name=f"loom-shm-{comm.name}", daemon=True)
        self._worker.start()

    @property
    def buffer(self) -> torch.Tensor:
        """This rank's data: ``numel`` elements in shared memory."""
        return self._data[self.rank]

    @property
    def peer_bytes(self) -> int:
        """Bytes of the peers' segments this rank maps: resident once read (every all-reduce
        reads all of them), so they count in this process's resident memory, though each
        page exists once on the host."""
        return sum(d.numel() * self.element_size for q, d in enumerate(self._data) if q != self.rank)

    def all_reduce(self, offset: int, numel: int, tag: str = "") -> Handle:
        """Start summing ``buffer[offset:offset + numel]`` over the group; returns a handle to wait on."""
        if self._closed:
            raise RuntimeError("this shared-memory all-reduce was closed")
        nbytes = numel * self.element_size
        entry = self.comm.ledger.begin(
            "all_reduce",
            self.comm.name,
            self.comm.ranks,
            numel,
            str(self.buffer.dtype).removeprefix("torch."),
            exact_bytes("all_reduce", self.size, nbytes, self.rank, 0),
            tag,
            note="shm",
        )
        work = _Work()
        self._queue.put((offset, numel, work))
        return Handle(work, self.comm.ledger, entry)

    def quiesce(self) -> None:
        """Wait until every peer has finished reading this rank's data (after the last call's wait).

        No ledger entry covers this wait: it raises after ``quiesce_timeout_s``."""
        self._wait_for(self._said, self.quiesce_timeout_s)

    def close(self) -> None:
        """Stop the worker and close the doorbells (after the last call's wait); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=5)
        for fd in (self._inbox, *self._bells):
            os.close(fd)

    # -- the worker --------------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            offset, numel, work = item
            try:
                self._reduce(offset, numel)
            except BaseException as exc:  # handed to the waiting caller
                work.error = exc
            work.done.set()

    def _reduce(self, offset: int, numel: int) -> None:
        n, r = self.size, self.rank
        # chunks[q][c]: chunk c of rank q's region, split as the ring algorithms split (loom.distributed.ring)
        chunks = [torch.tensor_split(data[offset : offset + numel], n) for data in self._data]
        self._say()  # 1: my region is final
        self._wait_for(self._said)
        for q in range(n):  # 2: chunk r of every peer into mine
            if q != r:
                chunks[r][r].add_(chunks[q][r])
        self._say()  # 3: my chunk is the sum
        self._wait_for(self._said)
        for c in range(n):  # 4: the other chunks from their owners
            if c != r:
                chunks[r][c].copy_(chunks[c][c])
        self._say()  # 5: done with my peers' data

    def _say(self) -> None:
        """Advance this rank's counter, then ring every peer's doorbell (after: a woken peer sees the count)."""
        self._said += 1
        self._counters[self.rank][0] = self._said
        for fd in self._bells:
            try:
                os.write(fd, b"\0")
            except BlockingIOError:  # the pipe is full of unread rings: that peer wakes anyway
                pass

    def _wait_for(self, value: int, timeout_s: float | None = None) -> None:
        """Until every peer's counter has reached ``value``: a short spin, then sleep on the doorbell.

        A ring read here may be older than the count it announces; the counters are read
        again after every wake-up, so no ring is lost.
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = None
        spins = 0
        while True:
            behind = [q for q in range(self.size) if int(self._counters[q][0]) < value]
            if not behind:
                return
            spins += 1
            if spins <= _SPIN:
                continue
            now = time.monotonic()
            deadline = deadline or now + limit
            if now > deadline:
                raise TimeoutError(
                    f"shared-memory all_reduce on the {self.comm.name} group: rank {self.comm.ranks[behind[0]]} did "
                    f"not reach step {value} within {limit:g} s (it died or is stuck)"
                )
            readable, _, _ = select.select([self._inbox], [], [], min(deadline - now, 1.0))
            if readable:
                try:
                    os.read(self._inbox, 4096)
                except BlockingIOError:
                    pass
