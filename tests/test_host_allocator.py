"""loom's host allocation policy: a one-thread process's large tensors on huge pages unless the user
says otherwise; a process of several threads left on 4 KiB pages unless the user opts it in.

torch reads ``THP_MEM_ALLOC_ENABLE`` once, at the process's first tensor, so each case runs in a
fresh interpreter."""

from __future__ import annotations

import json
import os
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
