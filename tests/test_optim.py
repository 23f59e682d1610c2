"""Learning-rate schedule, optimizer groups and mixed precision in the trainer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import tiny_overrides

from loom.config import load_config
from loom.optim.lr import lr_at
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer


def test_warmup_then_cosine_to_the_floor() -> None:
    lrs = [lr_at(s, 1.0, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway down
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lr_at(500, 1.0, 10, 110, 0.1) == pytest.approx(0.1)  # floor after the end


def test_no_weight_decay_on_norms_and_biases(tmp_path: Path, text_corpus: Path) -> None:
    trainer = Trainer(load_config(None, tiny_overrides(text_corpus)), tmp_path / "r")
    decay, no_decay = trainer.update.optimizer.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(tmp_path: Path, text_corpus: Path, precision: str) -> None:
    extra = {"train.steps": 3, "train.eval_every": 0, "train.ckpt_every": 0}
    Trainer(load_config(None, tiny_overrides(text_corpus, **extra)), tmp_path / "fp32").run()
    mixed = {**extra, "train.precision": precision}
    Trainer(load_config(None, tiny_overrides(text_corpus, **mixed)), tmp_path / precision).run()
    for a, b in zip(read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / precision)):
        assert math.isfinite(b["loss"])
        assert b["loss"] == pytest.approx(a["loss"], rel=0.03)
