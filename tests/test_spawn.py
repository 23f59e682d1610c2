"""The multi-process harness: results in rank order, failures surfaced, hangs killed, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from loom.distributed.spawn import RankFailure, run_ranks


def _descendants() -> set[int]:
    """Live processes below this one (zombies excluded), minus multiprocessing's resource tracker."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] == "Z" or b"resource_tracker" in cmdline:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = set(), [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"


# ---------------------------------------------------------------- rank bodies (module level)


def _report(tag: str) -> dict:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {
        "tag": tag,
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": t.item(),
        "env": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]),
        "extra": os.environ.get("LOOM_TEST_EXTRA"),
        "threads": torch.get_num_threads(),
    }


def _no_init() -> tuple:
    return dist.is_initialized(), int(os.environ["RANK"]), os.environ["MASTER_PORT"].isdigit()


def _raise_on_rank(bad: int) -> int:
    if int(os.environ["RANK"]) == bad:
        raise ValueError(f"deliberate failure on rank {bad}: marker-7f3a")
    time.sleep(60)  # the harness must kill this rank once the other one failed
    return 0


def _die(pid_file: str) -> int:
    """Rank 1 is SIGKILLed, then rank 0 exits without a result; rank 2 would sleep on."""
    rank = int(os.environ["RANK"])
    if rank == 1:
        Path(pid_file + ".tmp").write_text(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)  # rank 0 never reads a half-written file
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:  # die right after rank 1, well within the harness's grace after a failure
        while not Path(pid_file).exists() or _alive(int(Path(pid_file).read_text())):
            time.sleep(0.02)
        os._exit(3)
    time.sleep(60)
    return 0


def _hang_with_child(pid_file: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    Path(f"{pid_file}.{os.environ['RANK']}").write_text(str(child.pid))
    while True:
        time.sleep(0.1)


def _unpicklable_result() -> object:
    return lambda: None


# ---------------------------------------------------------------- tests


def test_results_in_rank_order_env_and_init() -> None:
    before = _descendants()
    results = run_ranks(_report, 3, args=("x",), env={"LOOM_TEST_EXTRA": "yes"}, timeout_s=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    for rank, r in enumerate(results):
        assert r["tag"] == "x" and r["world"] == 3 and r["sum"] == 6.0
        assert r["env"] == (str(rank), "3", str(rank), "127.0.0.1")
        assert r["extra"] == "yes" and r["threads"] == 1
    assert run_ranks(_no_init, 2, init=False, timeout_s=60) == [(False, 0, True), (False, 1, True)]
    assert _descendants() <= before


def test_raising_rank_reports_traceback_and_kills_the_rest() -> None:
    before = _descendants()
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_raise_on_rank, 2, args=(1,), timeout_s=50, init=False)
    assert time.monotonic() - start < 30  # did not wait for the sleeping rank
    text = str(info.value)
    assert "rank 1" in text and "Traceback" in text and "marker-7f3a" in text
    assert "_raise_on_rank" in text and "ValueError" in text
    assert "rank 0" in text and "killed by the harness" in text
    assert set(info.value.failures) == {0, 1}
    assert _descendants() <= before


def test_dead_ranks_reported_with_exit_code(tmp_path: Path) -> None:
    before = _descendants()
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_die, 3, args=(str(tmp_path / "pid"),), timeout_s=50, init=False)
    assert time.monotonic() - start < 30
    failures = info.value.failures
    assert "without a result" in failures[0] and "exit code 3" in failures[0]
    assert "without a result" in failures[1] and "SIGKILL" in failures[1]
    assert "killed by the harness" in failures[2]
    assert _descendants() <= before


def test_hang_is_killed_with_its_children(tmp_path: Path) -> None:
    before = _descendants()
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_hang_with_child, 2, args=(str(tmp_path / "pid"),), timeout_s=12, init=False)
    assert time.monotonic() - start < 30
    text = str(info.value)
    assert "had not finished" in text and "ranks [0, 1]" in text
    assert info.value.unfinished == [0, 1]
    assert "_hang_with_child" in text  # the stack each rank dumped before the kill
    for rank in (0, 1):
        grandchild = int((tmp_path / f"pid.{rank}").read_text())
        deadline = time.monotonic() + 5
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild)
    assert _descendants() <= before


def test_bad_function_or_result() -> None:
    with pytest.raises(TypeError, match="module-level"):
        run_ranks(lambda: 0, 1)
    with pytest.raises(RankFailure, match="could not be sent"):
        run_ranks(_unpicklable_result, 1, init=False, timeout_s=60)
