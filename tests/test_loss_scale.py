"""fp16's one loss scaler: an overflow on one tensor-parallel rank or one pipeline stage skips the
step on every rank, and the scale stays the same number everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_overrides

from loom.config import load_config
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.train.trainer import Trainer

POISONED_STEP = 1


def _overflow_on_one_rank(items: list[str], run_dir: str, dim: str) -> dict:
    config = load_config(None, items)
    ctx = init_distributed(config.parallel)
    trainer = Trainer(config, Path(run_dir), dist=ctx)
    update, step_now = trainer.update, [0]
    real_sync = update.sync_gradients

    def sync_then_poison() -> None:  # this rank alone sees an inf in one of its gradients
        real_sync()
        if step_now[0] == POISONED_STEP and getattr(ctx.coords, dim) == 1:
            next(p for p in trainer.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    update.sync_gradients = sync_then_poison
    skipped, scales = [], []
    for step in range(4):
        step_now[0] = step
        skipped.append(trainer.train_step(step).skipped)
        scales.append(update.scaler.scale)
    return {"skipped": skipped, "scales": scales, "loss_scale_bytes": ctx.ledger.totals()}


@pytest.mark.parametrize(
    ("layout", "dim"),
    [({"parallel.tp": 2}, "tp"), ({"parallel.pp": 2}, "pp"), ({}, "dp")],
    ids=["one tp rank", "one pipeline stage", "one dp rank"],
)
def test_an_overflow_anywhere_skips_the_step_everywhere(
    tmp_path: Path, text_corpus: Path, layout: dict, dim: str
) -> None:
    items = tiny_overrides(
        text_corpus,
        **{"train.precision": "fp16", "train.steps": 4, "train.eval_every": 0, "parallel.timeout_s": 60, **layout},
    )
    ranks = run_ranks(_overflow_on_one_rank, 2, args=(items, str(tmp_path), dim), timeout_s=120)
    want = [step == POISONED_STEP for step in range(4)]
    for rank in ranks:
        assert rank["skipped"] == want
        assert rank["scales"] == ranks[0]["scales"]
    scales = ranks[0]["scales"]
    assert scales[POISONED_STEP] == scales[0] / 2 and scales[-1] == scales[POISONED_STEP]  # backed off once
