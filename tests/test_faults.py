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
