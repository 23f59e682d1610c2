"""Metrics: jsonl records, resume truncation, TensorBoard, summary, loss plot, progress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from loom.errors import LoomError
from loom.train.event_file import masked_crc32c
from loom.train.metrics import (
    MetricsWriter,
    TrainProgress,
    read_metrics,
    write_summary,
)
from loom.viz.plot import plot_loss


def _log_steps(run: Path, steps: range, tensorboard: bool = False) -> None:
    with MetricsWriter(run, tensorboard=tensorboard) as writer:
        for step in steps:
            writer.log({"step": step, "loss": 4.0 / step, "lr": np.float32(1e-3), "tokens": torch.tensor(512)})


def test_jsonl_records_are_plain_numbers(tmp_path: Path) -> None:
    _log_steps(tmp_path, range(1, 4))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert type(records[0]["lr"]) is float and records[0]["tokens"] == 512
    with pytest.raises(ValueError, match="step"):
        MetricsWriter(tmp_path, tensorboard=False).log({"loss": 1.0})


def test_truncate_after_keeps_one_record_per_step(tmp_path: Path) -> None:
    _log_steps(tmp_path, range(1, 11))
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.truncate_after(6)
        for step in range(7, 9):
            writer.log({"step": step, "loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    _log_steps(tmp_path, range(1, 3))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # crash mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    _log_steps(tmp_path, range(3, 4))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_tensorboard_holds_every_numeric_field_of_each_step(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_steps(tmp_path, range(1, 4), tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr", "tokens"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 4.0), (2, 2.0), (3, pytest.approx(4 / 3))]
    assert [e.value for e in events.Scalars("tokens")] == [512, 512, 512]


def test_event_file_checksums_are_tensorboards(tmp_path: Path) -> None:
    """loom's C checksum equals TensorBoard's pure-Python one, and a file loom writes passes
    TensorBoard's reader, which checks every record's two checksums."""
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as python_crc

    rng = np.random.default_rng(0)
    for n in (0, 1, 8, 12, 1000, 4099):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == python_crc(data)
    _log_steps(tmp_path, range(1, 4), tensorboard=True)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    reader, records = PyRecordReader_New(str(events)), 0
    with pytest.raises(errors.OutOfRangeError):  # the end, every record checked (DataLossError otherwise)
        while True:
            reader.GetNext()
            records += 1
    assert records == 4  # the file's version, then one event a step


def test_tensorboard_drops_the_steps_a_resume_drops(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.log({"step": step, "loss": float(step)})
    with MetricsWriter(tmp_path) as writer:  # resumed from step 3's checkpoint
        writer.truncate_after(3)
        for step in range(4, 7):
            writer.log({"step": step, "loss": 10.0 * step})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50), (6, 60)]


def test_a_failed_tensorboard_write_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from loom.train.event_file import EventFile

    def full(self: EventFile, event: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with MetricsWriter(tmp_path) as writer:
        writer.log({"step": 1, "loss": 2.0})
        monkeypatch.setattr(EventFile, "_write", full)
        with pytest.raises(LoomError, match="No space left on device") as failed:
            writer.log({"step": 2, "loss": 1.0})
    assert "resume" in str(failed.value.fix) and "tensorboard" in str(failed.value)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # metrics.jsonl holds the step


def test_summary_json(tmp_path: Path) -> None:
    path = write_summary(tmp_path, {"final_loss": np.float64(1.25), "steps": 10, "layout": {"dp": 1}})
    assert path == tmp_path / "summary.json"
    assert json.loads(path.read_text()) == {"final_loss": 1.25, "steps": 10, "layout": {"dp": 1}}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_plot_loss_writes_png(tmp_path: Path) -> None:
    _log_steps(tmp_path, range(1, 20))
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log({"step": 19, "val_loss": 0.3})
    out = plot_loss(tmp_path, log_y=True)
    assert out == tmp_path / "loss.png"
    data = out.read_bytes()
    assert len(data) > 0 and data.startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_loss_without_metrics_is_a_loom_error(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="no loss to plot"):
        plot_loss(tmp_path)


def test_progress_without_terminal(tmp_path: Path) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=120)
    with TrainProgress(total_steps=20, console=console) as progress:
        for step in range(1, 21):
            progress.update(step, loss=3.0 / step, tokens_per_s=12345.0, lr=1e-3)
        progress.print("done")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 11  # one line every 2 steps, plus the message
    assert lines[-2].startswith("step 20/20 | loss 0.1500 | 12.3k tok/s | lr 1.00e-03")
    assert "\x1b[" not in buffer.getvalue()  # no terminal control codes


def _rank_figures_run() -> dict:
    """On a rank of 3: 40 records through RankFigures (steps of 0.5 s, then 10 ms), a flush,
    then 3 records abandoned."""
    import torch.distributed as dist

    from loom.distributed.comm import Comm, Ledger
    from loom.train.rank_figures import RankFigures

    rank = dist.get_rank()
    written: list[dict] = []
    figures = RankFigures(Comm.world(Ledger(rank)), written.append if rank == 0 else None)
    everies, pending = [], []
    for step in range(1, 41):
        slow = 0.5 if rank == 2 else 0.25  # the slowest rank sizes the batches: 1 s / 0.5 s = 2 records
        record = {"step": step, "step_s": slow if step <= 6 else 0.01, "comm_bytes_dp": 10 * step + rank}
        figures.add({**record, "mem_params_bytes": 1000 + rank})
        everies.append(figures.every)
        pending.append(step - len(written))
    figures.flush()
    flushed = len(written)
    for step in range(41, 44):
        figures.add({"step": step, "step_s": 0.01, "comm_bytes_dp": 1})
    figures.abandon()
    return {"written": written, "flushed": flushed, "everies": everies, "pending": pending, "gathers": figures.gathers}


def test_rank_figures_batches_the_gathers_and_completes_every_record_in_order() -> None:
    from loom.distributed.spawn import run_ranks
    from loom.train.rank_figures import MAX_BATCH

    results = run_ranks(_rank_figures_run, 3, timeout_s=90)
    assert all(r["written"] == [] for r in results[1:])  # only rank 0 writes
    assert len({tuple(r["everies"]) for r in results}) == 1  # every rank sizes the batches alike
    got = results[0]
    written = got["written"]
    assert [r["step"] for r in written] == list(range(1, 44)) and got["flushed"] == 40
    for record in written[:40]:
        step = record["step"]
        assert record["comm_bytes_dp"] == 10 * step  # rank 0's own figure, as it was
        assert record["comm_bytes_dp_max"] == 10 * step + 2 and record["comm_bytes_dp_sum"] == 30 * step + 3
        assert record["mem_params_bytes_sum"] == 3003 and "mem_optim_bytes_max" not in record  # only keys it holds
    assert all("comm_bytes_dp_max" not in r for r in written[40:])  # abandoned: this rank's figures alone
    everies = got["everies"]
    assert everies[0] == 1 and 2 in everies[:8] and everies[-1] == MAX_BATCH  # 1 s of 0.5 s steps, then the cap
    assert got["gathers"] < 10  # 40 records, batched (a gather a step: 40)
    assert max(got["pending"]) <= 2 * MAX_BATCH  # a record waits at most two batches
