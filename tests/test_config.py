"""Config loading, presets, overrides, batch arithmetic and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.config import derive_batch, load_config
from loom.errors import LoomError
from loom.presets import PRESETS


def test_defaults_are_the_demo() -> None:
    config = load_config()
    assert config.model.preset == "tiny" and config.model.family == "gpt2"
    assert config.data.corpus == "stdlib" and config.data.tokenizer == "byte"
    assert config.batch().global_batch == 16


def test_toml_then_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "llama-7b"\n[train]\nlr = 1e-4\nsteps = 10\n')
    config = load_config(path, ["train.lr=3e-4", "model.n_layers=2", "data.corpus=some/folder"])
    assert config.model.family == "llama" and config.model.d_model == 4096  # from the preset
    assert config.model.n_layers == 2  # override beats preset
    assert config.train.lr == 3e-4 and config.train.steps == 10
    assert config.data.corpus == "some/folder"  # bare words are strings


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "custom"])
def test_every_preset_validates(name: str) -> None:
    load_config(None, [f"model.preset={name}"])


@pytest.mark.parametrize(
    ("micro", "global_", "accum", "dp", "want"),
    [
        (8, None, None, 1, (8, 1)),
        (None, 64, None, 2, (32, 1)),
        (8, 64, None, 2, (8, 4)),
        (None, 64, 4, 2, (8, 4)),
        (8, 64, 4, 2, (8, 4)),
    ],
)
def test_batch_derivation(micro, global_, accum, dp, want) -> None:
    shape = derive_batch(micro, global_, accum, dp)
    assert (shape.micro_batch, shape.grad_accum) == want
    assert shape.global_batch == shape.micro_batch * shape.grad_accum * dp


def test_inconsistent_batch_names_all_three() -> None:
    with pytest.raises(LoomError) as err:
        load_config(None, ["train.micro_batch=8", "train.grad_accum=2", "train.global_batch=20"])
    text = str(err.value)
    assert "20" in text and "8" in text and "2" in text and "Fix" in text


@pytest.mark.parametrize(
    ("override", "names"),
    [
        (["train.lr=-0.1"], ["train.lr", "-0.1"]),
        (["train.lrr=0.1"], ["train.lrr", "train.lr"]),  # unknown key, with a suggestion
        (["model.preset=gpt5"], ["model.preset", "gpt5"]),
        (["model.family=bert"], ["model.family", "bert"]),
        (["model.n_heads=5"], ["model.d_model", "model.n_heads"]),
        (["train.precision=fp8"], ["train.precision", "fp8"]),
        (["parallel.cpu_affinity=pinned"], ["parallel.cpu_affinity", "pinned", "auto, none"]),
        (["parallel.comm_wait=spin"], ["parallel.comm_wait", "spin", "auto, poll, block"]),
        (["train.steps=ten"], ["train.steps", "ten"]),
        (["train.seq_len=1024"], ["train.seq_len", "model.max_seq_len"]),
        (["model.preset=tiny-llama", "model.n_kv_heads=3"], ["model.n_kv_heads", "3"]),
        (["optim.lr=1"], ["optim"]),
        (["lr=1"], ["section.key=value"]),
    ],
)
def test_bad_values_name_field_value_and_fix(override: list[str], names: list[str]) -> None:
    with pytest.raises(LoomError) as err:
        load_config(None, override)
    for name in names:
        assert name in str(err.value)
    assert err.value.fix


def test_bad_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train\nlr = ")
    with pytest.raises(LoomError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(LoomError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("override", "words"),
    [
        (["parallel.tp=3"], ["model.n_heads = 4", "parallel.tp = 3", "[2, 4]"]),
        (
            ["model.preset=tiny-llama", "model.n_heads=8", "model.n_kv_heads=4", "parallel.tp=8", "model.d_model=128"],
            [],
        ),  # tp a multiple of the KV heads: replicated, valid
        (
            ["model.preset=tiny-llama", "model.n_heads=12", "model.d_model=96", "model.n_kv_heads=4", "parallel.tp=6"],
            ["model.n_kv_heads = 4", "parallel.tp = 6"],
        ),
        (["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=127"], ["train.seq_len = 127"]),
        (["parallel.sequence_parallel=true"], ["parallel.tp = 1"]),
        (["parallel.tp=2", "model.d_ff=513"], ["513", "model.d_ff"]),
    ],
)
def test_tensor_parallel_layout_checks(override: list[str], words: list[str]) -> None:
    if not words:
        load_config(None, override)
        return
    with pytest.raises(LoomError) as err:
        load_config(None, override)
    for word in words:
        assert word in str(err.value)
