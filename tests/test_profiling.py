"""``train.profile_start``: the chosen steps run under torch.profiler; each profiled rank writes a
Chrome trace with loom's phases as named ranges and an operator table; those steps' records say
they were profiled, and the planner's measured medians leave them out."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import tiny_overrides

from loom.cli import main
from loom.config import load_config
from loom.errors import LoomError
from loom.plan.report import measured
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def trace_names(path: Path) -> set[str]:
    events = json.loads(path.read_text(encoding="utf-8"))["traceEvents"]
    return {e.get("name", "") for e in events}


def test_profiled_steps_write_a_trace_with_the_steps_phases_and_are_marked(tmp_path: Path, text_corpus: Path) -> None:
    items = tiny_overrides(text_corpus, **{"train.steps": 5, "train.profile_start": 2, "train.profile_steps": 2})
    run_dir = tmp_path / "run"
    Trainer(load_config(None, items), run_dir, live_progress=False).run()
    names = trace_names(run_dir / "profile" / "trace_rank0.json")
    assert {"loom.forward", "loom.backward", "loom.sync_gradients", "loom.clip", "loom.update"} <= names
    assert any(n.startswith("aten::") for n in names)  # the operators inside them
    table = (run_dir / "profile" / "ops_rank0.txt").read_text(encoding="utf-8")
    assert table.startswith("rank 0, steps 2-3: operators by self cpu time total") and "aten::" in table
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records if r.get("profiled")] == [2, 3]
    # the planner's measured step: the median train_step of the steps after the first that ran unprofiled (4 and 5)
    unprofiled = [r["step_s"] for r in records if r["step"] in (4, 5)]
    assert measured(records, 1)["step_s"] == pytest.approx(statistics.median(unprofiled))


def test_a_run_that_ends_inside_the_profiled_steps_writes_what_it_recorded(tmp_path: Path, text_corpus: Path) -> None:
    items = tiny_overrides(text_corpus, **{"train.steps": 4, "train.profile_start": 3, "train.profile_steps": 10})
    run_dir = tmp_path / "run"
    Trainer(load_config(None, items), run_dir, live_progress=False).run()
    assert (run_dir / "profile" / "ops_rank0.txt").read_text(encoding="utf-8").startswith("rank 0, steps 3-4:")
    assert "loom.update" in trace_names(run_dir / "profile" / "trace_rank0.json")


def test_without_profile_start_nothing_is_profiled(tmp_path: Path, text_corpus: Path) -> None:
    run_dir = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(text_corpus, **{"train.steps": 2})), run_dir, live_progress=False).run()
    assert not (run_dir / "profile").exists()
    assert not any(r.get("profiled") for r in read_metrics(run_dir))


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("profile_start", 9, "past the run's last step"),
        ("profile_steps", 0, "train.profile_steps"),
        ("profile_start", -1, ""),
    ],
)
def test_profile_fields_are_checked(field: str, value: int, words: str) -> None:
    with pytest.raises(LoomError, match=f"train.{field}") as err:
        load_config(None, ["train.steps=8", f"train.{field}={value}"])
    assert words in str(err.value)


def test_every_rank_profiles_when_asked_a_pipelines_actions_named_in_each_stages_trace(
    tmp_path: Path, text_corpus: Path
) -> None:
    run_dir = tmp_path / "pp"
    extra = {"train.steps": 3, "train.profile_start": 2, "train.profile_all_ranks": True, "parallel.pp": 2}
    argv = ["train", "--run-dir", str(run_dir), "--nproc", "2", "--no-progress"]
    assert main([*argv, *sets(tiny_overrides(text_corpus, **extra, **{"parallel.timeout_s": 60}))]) == 0
    first, last = (trace_names(run_dir / "profile" / f"trace_rank{r}.json") for r in (0, 1))
    for rank, names in enumerate((first, last)):
        assert {"loom.pipeline", "loom.sync_gradients", "loom.update"} <= names
        table = (run_dir / "profile" / f"ops_rank{rank}.txt").read_text(encoding="utf-8")
        assert table.startswith(f"rank {rank}, steps 2-3")
    assert {"loom.pp.F mb0 chunk0", "loom.pp.SEND_ACT mb0 chunk0", "loom.pp.B mb0 chunk0"} <= first
    assert {"loom.pp.RECV_ACT mb0 chunk0", "loom.pp.B mb0 chunk0", "loom.pp.SEND_GRAD mb0 chunk0"} <= last


def test_a_step_that_fails_under_the_profiler_still_leaves_its_trace_and_a_failed_write_only_says_so(
    tmp_path: Path, text_corpus: Path, monkeypatch
) -> None:  # noqa: ANN001
    from loom.train import profiling

    items = tiny_overrides(text_corpus, **{"train.steps": 4, "train.profile_start": 2})
    trainer = Trainer(load_config(None, items), tmp_path / "run", live_progress=False)
    real_step = trainer.train_step

    def failing(step: int):  # noqa: ANN202
        if step == 1:  # the second step, the first profiled
            raise RuntimeError("boom")
        return real_step(step)

    trainer.train_step = failing
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()
    ops = (tmp_path / "run" / "profile" / "ops_rank0.txt").read_text(encoding="utf-8")
    assert ops.startswith("rank 0, step 2 (unfinished):")

    said: list[str] = []
    profiler = profiling.StepProfiler(1, 1, tmp_path / "other", 0, True, False, said.append)

    def refuse(self, path: str) -> None:  # noqa: ANN001
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profiling.profile, "export_chrome_trace", refuse)
    profiler.begin(1)
    profiler.end(1)  # the last step of the range: it stops and writes, which fails, and says so
    assert said and said[0].startswith("could not write the profile of steps 1-1 on rank 0") and "No space" in said[0]
