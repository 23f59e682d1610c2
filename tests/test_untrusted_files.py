"""Files loom reads may come from anyone: a checkpoint, a config. None executes code, and each
defect is one clear message, not a traceback, even when meta.json was rewritten to match."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from loom.config import load_config
from loom.distributed.comm import Comm
from loom.distributed.ledger import Ledger
from loom.errors import LoomError
from loom.parallel.pieces import Piece
from loom.train.checkpoint_folder import META_FILE, file_record
from loom.train.sharded_checkpoint import open_checkpoint, save_sharded


def _checkpoint(tmp_path: Path) -> Path:
    comm = Comm("world", None, [0], Ledger(0))
    pieces = [Piece("model/w", (4, 3), (0, 0), torch.arange(12.0).view(4, 3))]
    return save_sharded(tmp_path, 1, pieces, {"run": {"step": 1}}, {}, keep=1, comm=comm)


def _reseal(path: Path, name: str) -> None:
    """Rewrite meta.json's record of ``name`` to match the file: only the contents can tell now."""
    meta = json.loads((path / META_FILE).read_text())
    meta["files"][name] = file_record(path / name)
    (path / META_FILE).write_text(json.dumps(meta))


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "code ran"))


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (path / "train_state.pt").write_bytes(pickle.dumps({"run": _Payload(marker)}))
    _reseal(path, "train_state.pt")
    with pytest.raises(LoomError, match="is damaged: its files could not be read") as caught:
        open_checkpoint(path)
    assert not marker.exists()
    assert caught.value.fix


def test_a_piece_whose_shape_disagrees_with_the_index_is_a_message(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    shard = next(path.glob("shard_*.safetensors"))
    safetensors.torch.save_file({"p0": torch.zeros(2, 3)}, shard)  # the index still says 4 x 3
    _reseal(path, shard.name)
    ckpt = open_checkpoint(path)
    with pytest.raises(LoomError, match="is damaged: .*model/w"):
        ckpt.tensors.full("model/w")


def test_an_index_naming_a_missing_piece_is_a_message(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    index = json.loads((path / "index.json").read_text())
    index["tensors"]["model/w"]["pieces"][0][1] = "p7"
    (path / "index.json").write_text(json.dumps(index))
    _reseal(path, "index.json")
    ckpt = open_checkpoint(path)
    with pytest.raises(LoomError, match="is damaged"):
        ckpt.tensors.full("model/w")


def test_a_config_that_is_not_utf8_or_not_toml_is_a_message(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[train]\nsample_prompt = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(LoomError, match="not valid TOML"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nlr = 3e-4\n")
    with pytest.raises(LoomError, match="not valid TOML"):
        load_config(broken)
