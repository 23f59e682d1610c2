"""loom's host allocation policy: a one-thread process's large tensors on huge pages unless the user
says otherwise; a process of several threads left on 4 KiB pages unless the user opts it in; a
kernel's fresh output faulted in at once (``populate``) only where it is a mapping of its own.

torch reads ``THP_MEM_ALLOC_ENABLE`` once, at the process's first tensor, so each case runs in a
fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loom.parallel.host_allocator import THP_MODE, THP_VARIABLE

PROBE = """
import json, os
import torch
from loom.parallel.host_allocator import huge_pages_on, set_host_allocator
early = torch.empty({early}, dtype=torch.uint8) if {early} else None  # a tensor before the policy
set_host_allocator(threads={threads})
on = huge_pages_on()
big = torch.empty(16 * 2**20, dtype=torch.uint8)
print(json.dumps({{"on": on, "page_aligned": big.data_ptr() % 4096 == 0, "variable": os.environ.get("{var}")}}))
"""


def _probe(env_value: str | None, early_bytes: int = 0, threads: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != THP_VARIABLE}
    if env_value is not None:
        env[THP_VARIABLE] = env_value
    code = PROBE.format(early=early_bytes, var=THP_VARIABLE, threads=threads)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


thp_usable = sys.platform == "linux" and Path(THP_MODE).exists() and "[never]" not in Path(THP_MODE).read_text()


@pytest.mark.skipif(not thp_usable, reason="the kernel offers no transparent huge pages here")
def test_large_tensors_get_huge_pages_and_the_ranks_inherit_the_setting() -> None:
    got = _probe(None)
    assert got == {"on": True, "page_aligned": True, "variable": "1"}


@pytest.mark.skipif(not thp_usable, reason="the kernel offers no transparent huge pages here")
def test_a_process_of_several_threads_stays_on_small_pages_unless_the_user_opts_in() -> None:
    assert _probe(None, threads=2) == {"on": False, "page_aligned": False, "variable": None}
    assert _probe("1", threads=2) == {"on": True, "page_aligned": True, "variable": "1"}


@pytest.mark.skipif(not thp_usable, reason="the kernel offers no transparent huge pages here")
def test_the_users_choice_stands_and_a_late_policy_says_it_did_not_take() -> None:
    assert _probe("0") == {"on": False, "page_aligned": False, "variable": "0"}
    # torch has already read the (unset) variable at its first tensor: the policy reports it off
    assert _probe(None, early_bytes=16) == {"on": False, "page_aligned": False, "variable": "1"}


POPULATE = """
import ctypes, json
import torch
from loom.parallel import host_allocator as ha

libc = ctypes.CDLL(None)
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

def resident(t):
    # pages of t's storage in memory (mincore), and whether a mapping that holds it is advised huge pages
    lo = t.untyped_storage().data_ptr()
    hi = lo + t.untyped_storage().nbytes()
    first = lo // 4096 * 4096
    vec = (ctypes.c_ubyte * ((hi - first + 4095) // 4096))()
    assert libc.mincore(first, hi - first, vec) == 0
    huge, inside = False, False
    for line in open("/proc/self/smaps"):
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and lo < end
        elif inside and line.startswith("VmFlags:"):
            huge = huge or "hg" in line.split()[1:]
    return sum(v & 1 for v in vec), huge

MiB = 2**20
unfixed = ha.populate(torch.empty(16 * MiB, dtype=torch.uint8))  # glibc's own threshold: may be its heap
ha.fix_mmap_threshold()
big = torch.empty(16 * MiB, dtype=torch.uint8)
before = resident(big)
same = ha.populate(big) is big
mapped = ha.populate(torch.empty(8 * MiB, dtype=torch.uint8))  # its own mapping, below POPULATE_MIN_BYTES
small = ha.populate(torch.empty(MiB, dtype=torch.uint8))
big.fill_(7)
print(json.dumps({"unfixed": resident(unfixed), "before": before, "after": resident(big), "same": same,
                  "mapped": resident(mapped), "small": resident(small), "kept": int(big.sum()) == 7 * 16 * MiB}))
"""


populate_usable = thp_usable and tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) >= (5, 14)


@pytest.mark.skipif(not populate_usable, reason="no transparent huge pages or no MADV_POPULATE_WRITE (Linux 5.14)")
def test_populate_faults_a_fresh_mapping_in_on_huge_pages_and_leaves_anything_else_alone() -> None:
    env = {k: v for k, v in os.environ.items() if k != THP_VARIABLE}  # torch's own huge pages off: 4 KiB until advised
    done = subprocess.run([sys.executable, "-c", POPULATE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["same"] and got["kept"]
    pages = 16 * 2**20 // 4096
    assert got["before"][0] <= 1 and not got["before"][1]  # a fresh mapping: its header page at most
    assert got["after"][0] >= pages and got["after"][1]  # every page in, its 2 MiB-aligned interior advised
    assert got["unfixed"][0] <= 1 and not got["unfixed"][1]  # the threshold not fixed: not touched
    assert got["mapped"][0] <= 1 and not got["mapped"][1]  # a fresh mapping below 16 MiB: not touched
    assert not got["small"][1]  # below the threshold (glibc's heap): not advised
