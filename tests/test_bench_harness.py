"""The benchmark harness (bench/common.py): how a round's step times become a side's figure.

A peer run alone is timed as ``loom train`` is (rank 0's laps, no barrier between steps); sides
run interleaved take the slowest rank's time of each step, which started after a barrier.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

# loaded by path under its own name: bench/ is not put on sys.path, where its ddp.py or
# pipeline.py would shadow other modules for the rest of the session
_spec = importlib.util.spec_from_file_location(
    "loom_bench_common", Path(__file__).resolve().parents[1] / "bench/common.py"
)
common = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = common  # dataclasses look their module up while the file runs
_spec.loader.exec_module(common)


class Sleeper(common.Side):
    """A side whose step sleeps ``step_s`` and returns k as its loss."""

    def __init__(self, name: str, step_s: float) -> None:
        self.name, self.step_s = name, step_s

    def step(self, k: int) -> float:
        time.sleep(self.step_s)
        return float(k)


def test_alone_runs_record_laps_and_interleaved_runs_step_times():
    runs = common.run_round([Sleeper("a", 0.002), Sleeper("b", 0.004)], steps=3, round_index=0, alone=True)
    assert runs["a"].laps and runs["b"].laps
    assert runs["a"].losses == [0.0, 1.0, 2.0]
    assert all(t >= 0.002 for t in runs["a"].step_s) and all(t >= 0.004 for t in runs["b"].step_s)
    mixed = common.run_round([Sleeper("a", 0.002), Sleeper("b", 0.004)], steps=3, round_index=1)
    assert not mixed["a"].laps and len(mixed["b"].step_s) == 3


def test_a_laps_figure_is_rank_0s_and_a_barrier_figure_the_slowest_ranks():
    result = common.Result("job", tokens=100, warmup=1)
    rank0 = {
        "peer": common.SideRun(step_s=[9.0, 1.0, 1.0, 1.0], laps=True),
        "loom": common.SideRun(step_s=[9.0, 1.0, 1.0, 1.0]),
    }
    rank1 = {
        "peer": common.SideRun(step_s=[9.0, 2.0, 2.0, 2.0], laps=True),
        "loom": common.SideRun(step_s=[9.0, 2.0, 2.0, 2.0]),
    }
    result.add_round([rank0, rank1])
    assert result.tps["peer"] == [100.0]  # rank 0's laps after the warm-up
    assert result.tps["loom"] == [50.0]  # each step the slowest rank's
