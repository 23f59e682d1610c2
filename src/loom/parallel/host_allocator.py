"""How a rank's host memory is allocated: glibc's mmap threshold and huge pages for large tensors.

A training step allocates and frees large host tensors (activations, gathered ZeRO-3 units,
gradient buckets, the logits) every step. Two settings decide what that costs, and
:func:`set_host_allocator` applies both at the start of a process (``loom train`` calls it before
its first tensor, :class:`loom.train.trainer.Trainer` again before the model exists, and the
benchmarks that time a kernel alone as their workers start):

- :func:`fix_mmap_threshold`: blocks of 4 MiB or more get their own mappings, returned to the
  OS on free, so the heap does not fragment (the resident-memory side);
- :func:`enable_huge_pages`: in a process of one compute thread (a rank of several on a CPU host),
  large tensors' fresh mappings are backed by 2 MiB transparent huge pages, so their first touch
  costs one fault per 2 MiB instead of one per 4 KiB (the speed side);
- :func:`fresh_pages` and :func:`populate`: a kernel that allocates a large output itself (loom's
  C++ sparse attention) faults its pages in at once, on huge pages, whatever the process's
  thread count.

Each is left alone where the user set its environment variable, and each is a no-op where the
platform lacks it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from pathlib import Path

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD_BYTES = 4 * 2**20
TRIM_THRESHOLD_BYTES = 64 * 2**20
HUGE_PAGE_BYTES = 2 * 2**20  # torch's threshold and alignment for a huge-page tensor
THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"  # torch's switch, read once, at its first allocation
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
SMAPS = Path("/proc/self/smaps")
PAGE_BYTES = 4096
POPULATE_MIN_BYTES = 16 * 2**20  # fresh_pages: smaller tensors fault as they are written
MADV_HUGEPAGE, MADV_POPULATE_WRITE = 14, 23  # Linux's madvise advice (the second since 5.14)

# Where this process fixed glibc's mmap threshold (fix_mmap_threshold): blocks from this size on are
# mappings of their own. A mirror of the C library's state, which is the process's, not an object's.
_own_mappings_from: int | None = None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library (mallopt, madvise, mincore), or None where it has not these."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def _thp_allowed() -> bool:
    """Whether Linux offers transparent huge pages here (its mode is not ``never``), read once."""
    return sys.platform == "linux" and THP_MODE.exists() and "[never]" not in THP_MODE.read_text()


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve host allocations of ``nbytes`` or more from their own mappings, returned to the OS on free.

    glibc raises its mmap threshold whenever a large block is freed (up to 32 MiB), after which
    blocks of that size come from the heap and stay cached there when freed. A training step
    allocates and frees large tensors in a changing order, so the heap fragments: measured on
    gpt2-124m under ZeRO-3 on 2 CPU ranks, the peak resident memory fell from 2.97 to 2.16 GB
    and the steady one from 2.3-2.5 to 1.3 GB with the threshold fixed at 4 MiB, at no
    measurable cost in speed on the demo model (a lower threshold, 128 KiB, cost 25-30%: every
    activation then page-faults afresh). Setting it also stops glibc's own adjustment of the trim
    threshold, which then stays at 128 KiB: the heap's free top is handed back to the OS as soon as
    it passes that, and the next step's blocks below ``nbytes`` page-fault afresh. So the trim
    threshold is set too, to ``TRIM_THRESHOLD_BYTES`` (64 MiB of free heap kept at most): measured on
    the block-sparse kernel at 8k tokens (fixed layout, 2 threads), 200,000 page faults and 1.3-1.5 s
    a call with the trim at 128 KiB, 17,000-29,000 and 0.82-0.88 s at 64-256 MiB, as with glibc's
    defaults. Left alone where the user set ``MALLOC_MMAP_THRESHOLD_`` (the trim threshold: where
    ``MALLOC_TRIM_THRESHOLD_``) and off glibc. Returns whether the mmap threshold was set.
    """
    global _own_mappings_from
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    libc = _libc()
    if libc is None:
        return False
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    fixed = bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    if fixed:
        _own_mappings_from = nbytes
    return fixed


def huge_pages_on() -> bool:
    """Whether torch now advises a large host tensor ``MADV_HUGEPAGE`` (what
    ``THP_MEM_ALLOC_ENABLE=1`` does): the mapping that holds a 2 MiB probe tensor carries the
    kernel's ``hg`` flag in ``/proc/self/smaps``. False off Linux."""
    if not SMAPS.exists():
        return False
    probe = torch.empty(HUGE_PAGE_BYTES, dtype=torch.uint8)
    address, span = probe.data_ptr(), None
    with SMAPS.open() as smaps:
        for line in smaps:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
                start, end = (int(x, 16) for x in head.split("-"))
                span = start <= address < end
            elif span and line.startswith("VmFlags:"):
                return "hg" in line.split()[1:]
    return False


def enable_huge_pages(threads: int) -> bool:
    """Back torch's host tensors of 2 MiB or more with transparent huge pages (torch's
    ``THP_MEM_ALLOC_ENABLE``) in a process that computes with one thread; returns whether it set
    the variable (:func:`huge_pages_on` says whether it took).

    With the mmap threshold fixed (:func:`fix_mmap_threshold`), every tensor of 4 MiB or more is
    a fresh mapping each step, and its first touch page-faults in 4 KiB pages: measured here, 3.3 ms
    to zero a fresh 16 MiB tensor against 0.3 ms for a reused one. With huge pages, one fault per
    2 MiB: a fresh 32 MiB zeroed by one thread in 5-6 ms against 11.5 on 4 KiB pages (this host,
    2 cores, glibc 2.36, THP mode "madvise"). Through ``loom train``, ranks of one thread each:
    gpt2-124m on 2 ranks (seq 128, micro-batch 1) 221 -> 244 tokens/s under DDP and 95 -> 129 under
    ZeRO-3 at 01da22f, 62 -> 67-70 under ZeRO-3 (global batch 2) on 2026-12-06's host; the demo
    model within +-5%.

    A process of several threads is left on 4 KiB pages: when its threads fault one fresh
    huge-page mapping at once (torch splits a large write between them), the faults serialise
    at a cost that moves with the host. On 2026-12-06's host the 32 MiB zeroed by two threads took
    25-50 ms on huge pages against 7.5 on 4 KiB pages (5 ms when one thread had touched its pages
    first), and a 2-layer d256 model at 16,384 tokens with sliding-window attention (one process,
    2 threads) trained at 8,800-9,000 tokens/s with them against 12,800-12,900 without; on the
    host of 01da22f the same run gained (18,100-18,500 -> 21,900-22,400). ``THP_MEM_ALLOC_ENABLE=1``
    opts such a process in.

    torch reads the variable once, at the process's first tensor, so ``loom train`` calls this
    before it makes any (and its ranks inherit the variable); called later (a script that made
    tensors before building a ``Trainer``), it cannot take effect. Left alone where the user set
    ``THP_MEM_ALLOC_ENABLE`` (``=0`` turns it off), off Linux, and where the kernel's THP mode is
    ``never``.
    """
    if not _thp_allowed() or threads > 1 or THP_VARIABLE in os.environ:
        return False
    os.environ[THP_VARIABLE] = "1"  # inherited by the ranks this process starts, too
    return True


def fresh_pages(t: torch.Tensor) -> tuple[int, int] | None:
    """The page-aligned address range ``[start, end)`` of ``t``'s storage where ``t`` is a CPU
    tensor just allocated as a mapping of its own, its 2 MiB-aligned interior now advised
    ``MADV_HUGEPAGE``; None anywhere else. Whoever writes it first faults the range in at once
    (:func:`populate`, or loom's C++ sparse kernel with its own threads).

    Where the mmap threshold is fixed (:func:`fix_mmap_threshold`), a large tensor is a fresh
    mapping whose first touch faults page by page, 4 KiB at a time where the process computes with
    several threads (:func:`enable_huge_pages` leaves those on small pages, since their threads
    faulting one huge-page mapping at once serialise). One ``MADV_POPULATE_WRITE`` over huge
    pages avoids both: measured here, a fresh 16 MiB tensor written by two threads took 3.4-3.6 ms
    on 4 KiB faults, and 1.5-1.6 ms populated on huge pages first; 64 MiB populate in 8.2 ms from
    one thread, 4.8 ms split between two.

    Only where it is known to be a fresh mapping: this process fixed the mmap threshold and
    ``t``'s storage is at least that large, its first interior page is not resident yet
    (``mincore``), and Linux's THP mode is not ``never``. Anywhere else (glibc's heap, another
    platform) the pages fault as they are written.

    And only from ``POPULATE_MIN_BYTES`` (16 MiB) on. On this host, a virtual machine that reclaims
    the memory its guest frees, a huge page fresh to the process can cost about a millisecond more
    to fault than its 512 small pages, which smaller outputs do not win back: loom's C++ sparse
    kernel (sliding window, 2 threads, after 8 untimed calls) took 20 ms at 2k tokens (4 MiB
    outputs) populated against 15.7 not, 28-52 ms at 4k (8 MiB) against 31, and 53 ms at 8k
    (16 MiB) against 61. Populating on small pages instead gained nothing measurable (15.3, 30.9).
    """
    storage = t.untyped_storage()
    least = max(POPULATE_MIN_BYTES, _own_mappings_from or 0)
    if t.device.type != "cpu" or _own_mappings_from is None or storage.nbytes() < least:
        return None
    libc = _libc()
    if libc is None or not _thp_allowed():
        return None
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first, last = -(-start // PAGE_BYTES) * PAGE_BYTES, end // PAGE_BYTES * PAGE_BYTES
    resident = ctypes.c_ubyte(0)
    if last - first < HUGE_PAGE_BYTES or libc.mincore(first, PAGE_BYTES, ctypes.byref(resident)) or resident.value & 1:
        return None
    huge_first, huge_last = -(-first // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES, last // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if huge_last > huge_first:
        libc.madvise(huge_first, huge_last - huge_first, MADV_HUGEPAGE)
    return first, last


def populate(t: torch.Tensor) -> torch.Tensor:
    """Fault in the pages of ``t``, a CPU tensor just allocated and not yet written, with one call
    from this thread, on huge pages, where :func:`fresh_pages` finds it a fresh mapping; return
    ``t``. Before Linux 5.14 (no ``MADV_POPULATE_WRITE``) the call fails harmlessly and the pages
    fault as they are written."""
    pages = fresh_pages(t)
    if pages is not None:
        _libc().madvise(pages[0], pages[1] - pages[0], MADV_POPULATE_WRITE)
    return t


def set_host_allocator(threads: int | None = None) -> None:
    """Apply loom's host allocation policy for a process that computes with ``threads`` threads
    (None: torch's current count): :func:`fix_mmap_threshold`, then :func:`enable_huge_pages`
    (:func:`huge_pages_on` says whether the second took)."""
    fix_mmap_threshold()
    enable_huge_pages(torch.get_num_threads() if threads is None else threads)
