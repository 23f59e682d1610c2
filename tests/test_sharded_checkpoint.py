"""Sharded checkpoints: boxes of flat ranges, exact cover, lazy reads of only a rank's own part,
atomic collective saves, damage found, and the consolidated export.

The resumes under other layouts that continue the single-process run are in ``test_3d.py``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from loom.cli import main
from loom.config import load_config
from loom.distributed.comm import Comm
from loom.distributed.context import init_distributed
from loom.distributed.ledger import Ledger
from loom.distributed.spawn import run_ranks
from loom.errors import LoomError
from loom.parallel.pieces import Piece, flat_boxes, real_shape
from loom.train import sharded_checkpoint
from loom.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from loom.train.sharded_checkpoint import open_checkpoint, save_sharded
from loom.train.trainer import Trainer


def _solo() -> Comm:
    return Comm("world", None, [0], Ledger(0))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 2), (2, 1, 3, 4)])
def test_flat_boxes_cover_a_range_exactly_in_order(shape: tuple[int, ...]) -> None:
    full = torch.arange(math.prod(shape)).reshape(shape)
    rng = random.Random(0)
    for _ in range(200):
        start = rng.randrange(full.numel())
        stop = rng.randrange(start + 1, full.numel() + 1)
        boxes = flat_boxes(shape, start, stop)
        assert len(boxes) <= 2 * (len(shape) - 1) + 1
        got = torch.cat([full[tuple(slice(o, o + s) for o, s in zip(*box))].reshape(-1) for box in boxes])
        assert torch.equal(got, torch.arange(start, stop))


def _pieces_of(full: torch.Tensor, cuts: list[int], key: str = "model/w") -> list[Piece]:
    """``full`` cut at flat positions ``cuts`` into pieces, as ZeRO's slices cut a parameter."""
    out = []
    for a, b in zip([0, *cuts], [*cuts, full.numel()]):
        for offsets, sizes in flat_boxes(tuple(full.shape), a, b):
            box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            out.append(Piece(key, tuple(full.shape), offsets, full[box].clone()))
    return out


def test_any_box_reads_back_from_pieces_cut_anywhere(tmp_path: Path) -> None:
    full = torch.randn(6, 10)
    pieces = _pieces_of(full, [7, 23, 41]) + [Piece("optim/w/step", (), (), torch.tensor(3.0))]
    path = save_sharded(tmp_path, 1, pieces, {"run": {}}, {"note": "unit"}, keep=1, comm=_solo())
    tensors = open_checkpoint(path).tensors
    assert tensors.shape("model/w") == (6, 10)
    for offsets, sizes in [((0, 0), (6, 10)), ((1, 3), (4, 5)), ((5, 9), (1, 1)), ((2, 0), (1, 10))]:
        box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        assert torch.equal(tensors.read("model/w", offsets, sizes, torch.float32), full[box])
    assert float(tensors.full("optim/w/step")) == 3.0
    assert torch.equal(load_checkpoint(path).model_state["w"], full)


def test_pieces_that_overlap_or_leave_a_gap_are_refused_and_nothing_is_installed(tmp_path: Path) -> None:
    full = torch.randn(4, 4)
    overlapping = _pieces_of(full, [8]) + _pieces_of(full, [8])[:1]
    with pytest.raises(LoomError, match="do not cover it once"):
        save_sharded(tmp_path, 1, overlapping, {}, {}, keep=1, comm=_solo())
    with pytest.raises(LoomError, match="do not cover it once"):
        save_sharded(tmp_path, 1, _pieces_of(full, [8])[1:], {}, {}, keep=1, comm=_solo())
    assert list_checkpoints(tmp_path) == []
    assert not list((tmp_path / "checkpoints").iterdir())  # no temp folder left either


def test_a_damaged_shard_is_found_by_its_checksum(tmp_path: Path) -> None:
    path = save_sharded(tmp_path, 1, _pieces_of(torch.randn(8, 8), [20]), {}, {}, keep=1, comm=_solo())
    shard = path / sharded_checkpoint.shard_file(0)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LoomError, match="sha256"):
        open_checkpoint(path)


def _resume_counting(items: list[str], run_dir: str, checkpoint: str) -> dict:
    """Resume under ZeRO, counting the elements each rank reads; with what it owns."""
    config = load_config(None, items)
    ctx = init_distributed(config.parallel)
    read = {"elements": 0}
    original = sharded_checkpoint.CheckpointTensors.read

    def counting(self, key, offsets, sizes, dtype):  # noqa: ANN001, ANN202
        read["elements"] += math.prod(sizes)
        return original(self, key, offsets, sizes, dtype)

    sharded_checkpoint.CheckpointTensors.read = counting
    try:
        trainer = Trainer(config, Path(run_dir), resume_from=Path(checkpoint), dist=ctx)
    finally:
        sharded_checkpoint.CheckpointTensors.read = original
    zero, places = trainer.update.zero, trainer.model.placements
    owned = 0
    for group in zero.groups:
        for name, offset in zip(group.names, group.offsets):
            real = math.prod(real_shape(places[name]))
            owned += max(0, min(offset + real, group.hi) - max(offset, group.lo))
    total = sum(p.numel() for p in trainer.model.parameters()) if zero.stage < 3 else None
    ctx.shutdown()
    return {"read": read["elements"], "owned": owned, "groups": len(zero.groups), "local_params": total}


def test_each_rank_reads_only_what_it_owns_and_writes_its_share(tmp_path: Path, text_corpus: Path) -> None:
    common = {"train.steps": 3, "train.ckpt_every": 2, "train.eval_every": 0, "train.global_batch": 8}
    one = tmp_path / "one"
    Trainer(load_config(None, tiny_overrides(text_corpus, **common)), one).run()
    step2 = one / "checkpoints" / "step_000002"
    assert json.loads((step2 / "meta.json").read_text())["format"] == "sharded"

    # the single process's checkpoint resumed as dp 4 under ZeRO-3: each rank reads its quarter
    items = tiny_overrides(text_corpus, **common, **{"zero.stage": 3, "train.micro_batch": 2})
    found = run_ranks(_resume_counting, 4, args=(items, str(tmp_path / "z3"), str(step2)), timeout_s=200)
    psi = sum(t.numel() for t in load_checkpoint(step2).model_state.values())
    for rank in found:
        # master weights and both moments of the owned elements, and one step count per group
        assert rank["read"] == 3 * rank["owned"] + rank["groups"]
        assert rank["owned"] <= psi / 4 + 4 * rank["groups"]  # padding: at most a few elements a group
    assert sum(r["owned"] for r in found) == psi

    # dp 2 without ZeRO writes each parameter once, the parameters spread over both ranks
    ddp = tmp_path / "ddp"
    assert main(["train", "--run-dir", str(ddp), "--nproc", "2", *_set(text_corpus, common)]) == 0
    shards = sorted((ddp / "checkpoints" / "step_000002").glob("shard_*.safetensors"))
    assert [p.name for p in shards] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    sizes = [p.stat().st_size for p in shards]
    assert max(sizes) < 0.75 * sum(sizes)


def _set(corpus: Path, extra: dict) -> list[str]:
    return [arg for item in tiny_overrides(corpus, **extra) for arg in ("--set", item)]


def test_convert_to_safetensors_consolidates_a_sharded_checkpoint(tmp_path: Path, text_corpus: Path) -> None:
    run = tmp_path / "run"
    extra = {"train.steps": 2, "train.ckpt_every": 2, "train.eval_every": 0, "parallel.tp": 2}
    assert main(["train", "--run-dir", str(run), "--nproc", "2", *_set(text_corpus, extra)]) == 0
    out = tmp_path / "one"
    assert main(["convert", str(run), "--to", "safetensors", "--out", str(out)]) == 0
    single = latest_checkpoint(out)
    assert (single / "model.safetensors").is_file() and "format" not in json.loads((single / "meta.json").read_text())
    mine, theirs = load_checkpoint(run), load_checkpoint(single)
    assert mine.step == theirs.step == 2
    assert mine.model_state.keys() == theirs.model_state.keys()
    for name, value in mine.model_state.items():
        assert torch.equal(theirs.model_state[name], value), name
        for what in ("exp_avg", "exp_avg_sq"):
            got = theirs.train_state["optimizer"]["state"][name][what]
            assert torch.equal(got, mine.train_state["optimizer"]["state"][name][what])
