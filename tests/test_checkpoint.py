"""Checkpoints: round trip, atomicity, retention, integrity checks, weights_only safety."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from loom.errors import LoomError
from loom.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(x))))


def _trained() -> tuple[Tied, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 11, (4, 5))
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    return model, opt


def _save(run: Path, step: int, keep: int = 3) -> Path:
    return save_checkpoint(
        run, step, {"w": torch.full((3,), float(step))}, {"data_pos": step}, {"config": {}}, keep=keep
    )


def test_round_trip_restores_model_optimizer_and_rng(tmp_path: Path) -> None:
    model, opt = _trained()
    rng = capture_rng_state()
    meta = {"config": {"train": {"lr": 0.01}}, "note": "hi"}
    path = save_checkpoint(
        tmp_path, 7, model.state_dict(), {"optimizer": opt.state_dict(), "rng": rng, "data_pos": 40}, meta, keep=2
    )
    assert path == tmp_path / "checkpoints" / "step_000007"
    expected = [random.random(), np.random.rand(), torch.rand(3)]

    ckpt = load_checkpoint(path)
    assert ckpt.step == 7 and ckpt.meta["config"] == meta["config"] and ckpt.meta["note"] == "hi"
    assert set(ckpt.meta["files"]) == {"model.safetensors", "train_state.pt"}
    restored = Tied()
    restored.load_state_dict(ckpt.model_state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert restored.head.weight is restored.embed.weight  # loading keeps the tie
    opt2 = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt.train_state["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert ckpt.train_state["data_pos"] == 40

    restore_rng_state(ckpt.train_state["rng"])
    assert [random.random(), np.random.rand()] == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_run_folder_resolves_to_latest(tmp_path: Path) -> None:
    for step in (100, 20, 300):
        _save(tmp_path, step)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / f"step_{s:06d}" for s in (20, 100, 300)]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000300"
    assert load_checkpoint(tmp_path).step == 300
    assert load_checkpoint(tmp_path / "checkpoints").step == 300
    empty = tmp_path / "empty"
    empty.mkdir()
    assert latest_checkpoint(empty) is None
    with pytest.raises(LoomError, match="no complete checkpoint"):
        load_checkpoint(empty)


def test_keep_retains_newest(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000005"]


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    _save(tmp_path, 5)
    save_checkpoint(tmp_path, 5, {"w": torch.zeros(2)}, {}, {}, keep=3)
    assert load_checkpoint(tmp_path).model_state["w"].shape == (2,)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000005"]


def test_leftover_tmp_is_ignored_and_cleaned(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    # A crashed save: a finished-looking temp folder that was never renamed in.
    crashed = tmp_path / "checkpoints" / ".tmp-step_000002-abc"
    crashed.mkdir()
    (crashed / "meta.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000001"
    with pytest.raises(LoomError, match="unfinished save"):
        load_checkpoint(crashed)
    _save(tmp_path, 3)
    assert not crashed.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000003"]


def test_failed_save_leaves_no_trace(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 2, {"w": torch.ones(1)}, {"bad": object()}, {}, keep=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]


@pytest.mark.parametrize("bad", [object(), np.float64(1.0), np.zeros(2), lambda: 0])
def test_weights_only_violation_rejected_at_save(tmp_path: Path, bad: object) -> None:
    with pytest.raises(TypeError, match=r"train_state\['nested'\]\[1\]"):
        save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"nested": [1, bad]}, {}, keep=1)
    assert list_checkpoints(tmp_path) == []


def test_truncated_weights_rejected(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5])
    with pytest.raises(LoomError) as err:
        load_checkpoint(path)
    assert "model.safetensors" in err.value.problem and "bytes" in err.value.problem
    assert "--resume" in err.value.fix and "step_000001" in err.value.fix


def test_tampered_byte_rejected(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    state = path / "train_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(LoomError, match="train_state.pt does not match the sha256"):
        load_checkpoint(path)


def test_missing_meta_is_not_a_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    (path / "meta.json").unlink()
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_000001"]
    with pytest.raises(LoomError, match="meta.json is missing"):
        load_checkpoint(path)
    with pytest.raises(LoomError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
