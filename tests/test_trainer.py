"""The training loop end to end: resume exactness, accumulation, what a run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from loom.cli import main
from loom.config import load_config
from loom.train.checkpoint import latest_checkpoint, list_checkpoints
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer


def run(tmp_path: Path, name: str, corpus: Path, resume: Path | None = None, **extra: object) -> Trainer:
    trainer = Trainer(load_config(None, tiny_overrides(corpus, **extra)), tmp_path / name, resume_from=resume)
    trainer.run()
    return trainer


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resume_equals_uninterrupted(tmp_path: Path, text_corpus: Path, family: str) -> None:
    # dropout on, so the restored RNG state matters too
    extra = {"model.family": family, "model.dropout": 0.1}
    whole = run(tmp_path, "whole", text_corpus, **extra)
    halfway = tmp_path / "whole" / "checkpoints" / "step_000003"
    resumed = run(tmp_path, "resumed", text_corpus, resume=halfway, **extra)
    want = [r for r in read_metrics(tmp_path / "whole") if r["step"] > 3]
    got = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in got] == [4, 5, 6]
    for a, b in zip(want, got):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"]
        assert a.get("val_loss") == b.get("val_loss")
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_resume_from_an_earlier_checkpoint_of_the_same_run(tmp_path: Path, text_corpus: Path) -> None:
    run(tmp_path, "run", text_corpus)
    first = read_metrics(tmp_path / "run")
    run(tmp_path, "run", text_corpus, resume=tmp_path / "run" / "checkpoints" / "step_000003")
    assert read_metrics(tmp_path / "run") == [
        {
            **r,
            "elapsed_s": pytest.approx(r["elapsed_s"], abs=10),
            "tokens_per_s": pytest.approx(r["tokens_per_s"], rel=10),
            "step_s": pytest.approx(r["step_s"], rel=10),
            # the process's peak resident memory: both runs share this process, so the second's is the max of both
            "mem_peak_host_bytes": pytest.approx(r["mem_peak_host_bytes"], rel=0.5),
        }
        for r in first
    ]  # one record per step, the same losses
    aside = list(tmp_path.glob("run/checkpoints-abandoned-*/step_000006"))
    assert len(aside) == 1  # the abandoned future is kept, not deleted
    assert latest_checkpoint(tmp_path / "run").name == "step_000006"  # the new one


def test_accumulation_equals_one_big_batch(tmp_path: Path, text_corpus: Path) -> None:
    big = run(tmp_path, "big", text_corpus, **{"train.micro_batch": 8, "train.steps": 3})
    accum = run(tmp_path, "accum", text_corpus, **{"train.micro_batch": 2, "train.grad_accum": 4, "train.steps": 3})
    for a, b in zip(read_metrics(tmp_path / "big"), read_metrics(tmp_path / "accum")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for p, q in zip(big.model.parameters(), accum.model.parameters()):
        # Adam divides by sqrt(v): near-zero gradients turn round-off into ~1e-6 updates
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_a_run_writes_metrics_summary_plot_checkpoints(tmp_path: Path, text_corpus: Path, capsys) -> None:
    run_dir = tmp_path / "cli"
    argv = ["train", "--run-dir", str(run_dir), "--no-progress"]
    for item in tiny_overrides(text_corpus, **{"train.sample_tokens": 20, "train.keep_ckpts": 1}):
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "done: 6 steps" in out and "sample" in out
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_s", "elapsed_s"):
        assert key in records[0]
    for r in records:  # a step's share of the loop holds its train_step, and elapsed_s adds up the shares
        assert r["tokens"] / r["step"] / r["tokens_per_s"] >= r["step_s"] > 0
    assert records[-1]["elapsed_s"] == pytest.approx(sum(r["tokens"] / r["step"] / r["tokens_per_s"] for r in records))
    assert records[-1]["tokens"] == 6 * 4 * 32
    assert "val_loss" in records[2] and "val_loss" in records[5]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["params"] > 0 and summary["final_loss"] == records[-1]["loss"]
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "tensorboard").iterdir())
    assert (run_dir / "sample.txt").read_text().startswith("def ")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000006"]  # keep_ckpts = 1

    # continuing needs --resume; with it, the checkpoint's config plus --set applies
    assert main(["train", "--run-dir", str(run_dir), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run_dir), "--resume", "--no-progress", "--set", "train.steps=8"]) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
    assert latest_checkpoint(run_dir).name == "step_000008"
    capsys.readouterr()

    assert main(["generate", str(run_dir), "--prompt", "def f", "--tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("def f")
