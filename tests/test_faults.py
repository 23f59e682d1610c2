"""Faults a real run meets: non-finite steps skipped alike on every rank and stopped after
``train.max_bad_steps`` with the first bad gradient named, and no checkpoint holding an inf or NaN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loom.distributed.comm import Comm
from loom.distributed.context import init_distributed
from loom.distributed.ledger import Ledger
from loom.distributed.spawn import RankFailure, run_ranks
from loom.errors import LoomError
from loom.parallel.pieces import Piece
from loom.train.checkpoint_folder import list_checkpoints
from loom.train.sharded_checkpoint import save_sharded

POISONED = "blocks.1.mlp.up_proj.weight"


def _train_poisoned(items: list[str], run_dir: str, bad_steps: list[int], bad_rank: int) -> list | None:
    """A run whose ``POISONED`` gradient is NaN on ``bad_rank`` at the (1-based) ``bad_steps``."""
    from loom.config import load_config
    from loom.train.metrics import read_metrics
    from loom.train.trainer import Trainer

    config = load_config(None, items)
    ctx = init_distributed(config.parallel)
    trainer = Trainer(config, Path(run_dir), dist=ctx, live_progress=False)
    places = trainer.model.placements
    if ctx.rank == bad_rank:
        poison = lambda g: g * float("nan") if trainer.state.step + 1 in bad_steps else g  # noqa: E731
        places.param(POISONED).register_hook(poison)
    try:
        trainer.run()
    finally:
        out = read_metrics(Path(run_dir)) if ctx.is_main else None
        ctx.shutdown()
    return out


def test_a_non_finite_step_is_skipped_everywhere_and_a_run_of_them_stops_naming_the_gradient(
    tmp_path,
    text_corpus,  # noqa: ANN001
) -> None:
    from conftest import tiny_overrides

    common = {"train.steps": 8, "train.global_batch": 8, "train.eval_every": 0, "train.ckpt_every": 4}
    # dp2 (DDP, fp32): rank 1's gradient is NaN at step 3 only; every rank skips that step and goes on
    items = tiny_overrides(text_corpus, **common)
    got = run_ranks(_train_poisoned, 2, args=(items, str(tmp_path / "once"), [3], 1), timeout_s=300)[0]
    assert [r.get("skipped", False) for r in got] == [False, False, True, *[False] * 5]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in got)
    assert got[-1]["loss"] < got[0]["loss"]
    # ZeRO-2 in bf16: three in a row stop the run on every rank, the step and the gradient named;
    # the checkpoint of step 4 (before them) is the newest, and holds only finite values
    items = tiny_overrides(text_corpus, **common, **{"zero.stage": 2, "train.precision": "bf16"})
    with pytest.raises(RankFailure) as failure:
        run_ranks(_train_poisoned, 2, args=(items, str(tmp_path / "thrice"), [5, 6, 7], 0), timeout_s=300)
    message = str(failure.value)
    assert message.count("step 7: loss") == 2  # both ranks stop with the same message
    assert POISONED in message and "train.max_bad_steps = 3" in message
    assert [p.name for p in list_checkpoints(tmp_path / "thrice")] == ["step_000004"]


def test_a_checkpoint_holding_an_inf_or_nan_is_refused_before_anything_is_written(tmp_path) -> None:  # noqa: ANN001
    comm = Comm("world", None, [0], Ledger(0))
    good = [Piece("model/w", (2, 3), (0, 0), torch.ones(2, 3))]
    save_sharded(tmp_path, 1, good, {"run": {}}, {}, keep=2, comm=comm)
    bad = [Piece("model/w", (2, 3), (0, 0), torch.tensor([[1.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]))]
    with pytest.raises(LoomError, match="model/w holds an inf or NaN"):
        save_sharded(tmp_path, 2, bad, {"run": {}}, {}, keep=2, comm=comm)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())  # no partial folder


# ----------------------------------------------------------------------------- restart by itself


def _rank_pids(launcher: int) -> dict[int, int]:
    """The rank processes under ``launcher`` (a ``loom train --nproc`` run): RANK -> pid."""
    import psutil

    found = {}
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if "RANK" in env and "loom.cli" in " ".join(child.cmdline()):
            found[int(env["RANK"])] = child.pid
    return found


def _losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss of a run's metrics so far (none before its first step)."""
    from loom.train.metrics import read_metrics

    if not (run_dir / "metrics.jsonl").exists():
        return {}
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_max_restarts_resumes_a_killed_run_from_its_newest_checkpoint_on_the_same_curve(tmp_path, text_corpus) -> None:  # noqa: ANN001
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import tiny_overrides

    items = tiny_overrides(text_corpus, **{"train.steps": 60, "train.global_batch": 8, "train.eval_every": 0})
    items += ["train.ckpt_every=5"]
    cmd = [sys.executable, "-m", "loom.cli", "train", "--nproc", "2", "--no-progress"]
    cmd += [arg for item in items for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = subprocess.run([*cmd, "--run-dir", str(tmp_path / "clean")], env=env, capture_output=True, timeout=300)
    assert clean.returncode == 0, clean.stderr.decode()[-2000:]
    run = tmp_path / "killed"
    job = subprocess.Popen(
        [*cmd, "--run-dir", str(run), "--max-restarts", "1"], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while len(_losses(run)) < 12:
        assert time.monotonic() < deadline and job.poll() is None, "the run ended before the fault"
        time.sleep(0.01)
    killed_at = len(_losses(run))
    os.kill(_rank_pids(job.pid)[1], signal.SIGKILL)  # rank 1, mid-run
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-2000:]
    assert killed_at < 60 and "restart 1: resuming from" in err
    want, got = _losses(tmp_path / "clean"), _losses(run)
    assert sorted(got) == list(range(1, 61))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-5)


# ----------------------------------------------------------------------------- a full disk


class _HalfFull:
    """A file whose next write stores half its bytes, then fails as a full disk does."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner = inner

    def fileno(self) -> int:
        return self.inner.fileno()

    def write(self, data: bytes) -> int:
        import errno

        self.inner.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.inner.close()


def test_a_full_disk_takes_the_metrics_line_back_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import errno

    import safetensors.torch

    from loom.train import sharded_checkpoint
    from loom.train.metrics import MetricsWriter, read_metrics
    from loom.train.sharded_checkpoint import open_checkpoint

    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.log({"step": 1, "loss": 2.5})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    writer._file = _HalfFull(writer._file)
    with pytest.raises(LoomError, match="No space left on device"):
        writer.log({"step": 2, "loss": 2.4})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # no half line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]

    comm = Comm("world", None, [0], Ledger(0))
    pieces = [Piece("model/w", (2, 3), (0, 0), torch.ones(2, 3))]
    save_sharded(tmp_path, 1, pieces, {"run": {}}, {}, keep=2, comm=comm)

    real = safetensors.torch.save_file

    def full_disk(tensors, path) -> None:  # noqa: ANN001
        real(tensors, path)
        with open(path, "r+b") as f:
            f.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sharded_checkpoint.safetensors.torch, "save_file", full_disk)
    with pytest.raises(LoomError, match="No space left on device") as caught:
        save_sharded(tmp_path, 2, pieces, {"run": {}}, {}, keep=2, comm=comm)
    assert "free space" in caught.value.fix
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())
    ckpt = open_checkpoint(list_checkpoints(tmp_path)[0])  # checksums verified
    assert torch.equal(ckpt.tensors.full("model/w"), torch.ones(2, 3))


# ----------------------------------------------------------------------------- a layout that cannot fit


def test_a_layout_that_cannot_fit_is_refused_before_start_with_the_figures(tmp_path, capsys) -> None:  # noqa: ANN001
    from loom.cli import main
    from loom.config import load_config
    from loom.plan.fit import GIB, check_fits
    from loom.plan.hardware import hardware_of
    from loom.plan.report import predict_run

    config = load_config(None, ["model.preset=llama-7b", "model.vocab_size=32000", "zero.stage=3"])
    prediction = predict_run(config, 8, hardware_of("cuda", "H100"), "cuda")
    check_fits(prediction, 8, "cuda", 80 * GIB, 2048 * GIB)  # ZeRO-3 over 8 H100s: fits
    with pytest.raises(LoomError, match=r"predicts \d+\.\d\d GiB on the most loaded rank .* its GPU has 16\.00 GiB"):
        check_fits(prediction, 8, "cuda", 16 * GIB, 2048 * GIB)
    with pytest.raises(LoomError, match=r"host memory for the 8 rank\(s\)"):
        check_fits(prediction, 8, "cpu", 0, 64 * GIB)  # the same run on CPUs: eight ranks share the host
    # the command refuses it before anything starts, naming the override
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--set", "model.preset=gpt3-175b"])
    err = capsys.readouterr().err
    assert code == 2 and "GiB of host memory" in err and "train.memory_check = false" in err
    assert not (tmp_path / "run").exists()
