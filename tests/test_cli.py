"""The loom command: help texts, and every bad input gets one paragraph with a fix, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

from loom.cli import main
from loom.train.checkpoint import latest_checkpoint
from loom.train.data import write_token_file
from loom.train.generate import generate, load_for_inference


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize(
    "command", [[], ["train"], ["generate"], ["convert"], ["tokenizer", "train"], ["plot"], ["config"]]
)
def test_help_is_useful(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loom")
    if not command:
        for sub in ("train", "generate", "convert", "tokenizer", "plot", "config", "presets", "examples:"):
            assert sub in out


def expect_error(argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loom: error:") and "fix:" in err and "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def test_bad_config_values(tmp_path: Path, capsys) -> None:
    run = ["train", "--run-dir", str(tmp_path / "r")]
    expect_error([*run, "--set", "train.lr=-1e-3"], capsys, "train.lr", "-0.001")
    expect_error([*run, "--set", "train.lerning_rate=1"], capsys, "train.lerning_rate")
    expect_error([*run, "--config", str(tmp_path / "none.toml")], capsys, "none.toml")


def test_bad_corpora(tmp_path: Path, capsys) -> None:
    run = ["train", "--run-dir", str(tmp_path / "r"), "--no-progress"]
    expect_error([*run, "--set", f"data.corpus={tmp_path / 'nowhere'}"], capsys, "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error([*run, "--set", f"data.corpus={empty}"], capsys, "empty")
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    expect_error([*run, "--set", f"data.corpus={latin}"], capsys, "a.txt", "UTF-8")
    token_file = write_token_file(tmp_path / "toks.bin", np.arange(1000, dtype=np.uint16) % 250)
    with open(token_file, "r+b") as f:
        f.truncate(1000)  # half of the 2000 bytes it should have
    expect_error([*run, "--set", f"data.corpus={token_file}"], capsys, "toks.bin", "truncated")


def test_damaged_checkpoints(tmp_path: Path, text_corpus: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", *sets(tiny_overrides(text_corpus))]) == 0
    capsys.readouterr()
    resume = ["train", "--run-dir", str(tmp_path / "again"), "--no-progress", "--resume"]
    weights = run_dir / "checkpoints" / "step_000006" / "shard_00000.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # tampered: same size, one byte changed
    weights.write_bytes(bytes(data))
    expect_error(
        [*resume, str(weights.parent), *sets(["train.steps=9"])], capsys, "shard_00000.safetensors", "step_000003"
    )
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    expect_error([*resume, str(weights.parent), *sets(["train.steps=9"])], capsys, "shard_00000.safetensors")
    expect_error(["generate", str(weights.parent)], capsys, "shard_00000.safetensors")
    expect_error(["train", "--run-dir", str(tmp_path / "fresh"), "--resume"], capsys, "no complete checkpoint")


def test_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loom.cli", "train", "--run-dir", str(tmp_path / "r"), "--set", "model.n_heads=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model.n_heads" in proc.stderr and "fix:" in proc.stderr and "Traceback" not in proc.stderr


def test_trained_bpe_tokenizer_drives_a_run(tmp_path: Path, text_corpus: Path, capsys) -> None:
    tok = tmp_path / "tok" / "tokenizer.json"
    assert main(["tokenizer", "train", "--corpus", str(text_corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert "data.tokenizer" in capsys.readouterr().out
    run_dir = tmp_path / "bpe"
    argv = ["train", "--run-dir", str(run_dir), "--no-progress"]
    assert main([*argv, *sets(tiny_overrides(text_corpus, **{"data.tokenizer": str(tok), "train.steps": 3}))]) == 0
    capsys.readouterr()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["model"]["vocab_size"] == 300  # the model follows the tokenizer
    assert main(["generate", str(run_dir), "--prompt", "def f", "--tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def f")


def test_bad_layout_is_rejected_before_processes_start(tmp_path: Path, capsys) -> None:
    argv = ["train", "--run-dir", str(tmp_path / "r"), "--nproc", "3", "--set", "parallel.tp=2"]
    expect_error(argv, capsys, "3 processes", "parallel.tp x parallel.pp")
    assert not (tmp_path / "r").exists()


def test_nproc_launches_local_ranks(tmp_path: Path, text_corpus: Path, capsys) -> None:
    run_dir = tmp_path / "ddp"
    argv = ["train", "--run-dir", str(run_dir), "--nproc", "2"]
    assert main([*argv, *sets(tiny_overrides(text_corpus, **{"train.steps": 3, "parallel.timeout_s": 60}))]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["comm_bytes_dp"] > 0 for r in records)
    assert json.loads((run_dir / "summary.json").read_text())["config"]["parallel"]["timeout_s"] == 60


def test_pipelined_run_samples_from_its_final_checkpoint(tmp_path: Path, text_corpus: Path) -> None:
    # rank 0 holds the first stage only: the sample needs the merged checkpoint
    run_dir = tmp_path / "pp"
    overrides = tiny_overrides(
        text_corpus, **{"train.steps": 2, "train.sample_tokens": 8, "parallel.pp": 2, "parallel.timeout_s": 60}
    )
    assert main(["train", "--run-dir", str(run_dir), "--nproc", "2", *sets(overrides)]) == 0
    model, config, tokenizer = load_for_inference(latest_checkpoint(run_dir), "cpu")
    ids = generate(model, tokenizer.encode("def "), 8, config.model.max_seq_len, seed=config.train.seed)
    assert (run_dir / "sample.txt").read_text(encoding="utf-8") == "def " + tokenizer.decode(ids)
