"""A process killed (SIGKILL) at random points while it writes checkpoints, again and again, never
leaves a partial checkpoint that ``--resume`` would pick: the newest complete one always loads,
its checksums verified, and it holds the state that step wrote. Both formats: one file of full
tensors, and the sharded one ``loom train`` writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loom.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

SINGLE_FILE = """
import sys, torch
from pathlib import Path
from loom.train.checkpoint import save_checkpoint
run, start = Path(sys.argv[1]), int(sys.argv[2])
for step in range(start, start + 1000):
    value = float(step)
    model = {f"w{i}": torch.full((256, 256), value) for i in range(24)}  # 6 MB a checkpoint
    save_checkpoint(run, step, model, {"step": step}, {"note": "kill test"}, keep=2)
    print(step, flush=True)
"""

SHARDED = """
import sys, torch
from pathlib import Path
from loom.distributed.comm import Comm
from loom.distributed.ledger import Ledger
from loom.parallel.pieces import Piece
from loom.train.sharded_checkpoint import save_sharded
run, start = Path(sys.argv[1]), int(sys.argv[2])
comm = Comm("world", None, [0], Ledger(0))
for step in range(start, start + 1000):
    value = float(step)
    halves = [(0, 0), (128, 0)]  # each tensor in two pieces, as two ranks would write it
    pieces = [Piece(f"model/w{i}", (256, 256), at, torch.full((128, 256), value)) for i in range(24) for at in halves]
    save_sharded(run, step, pieces, {"step": step}, {"note": "kill test"}, keep=2, comm=comm)
    print(step, flush=True)
"""


@pytest.mark.parametrize("writer", [SINGLE_FILE, SHARDED], ids=["single file", "sharded"])
def test_kills_during_saves_never_leave_a_partial_checkpoint_to_resume(tmp_path: Path, writer: str) -> None:
    run = tmp_path / "run"
    rng = random.Random(0)
    start = 1
    for trial in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", writer, str(run), str(start)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        proc.stdout.readline()  # one save done: from here on, kill anywhere
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        newest = latest_checkpoint(run)
        assert newest is not None, trial
        ckpt = load_checkpoint(newest)  # verifies every file's sha256 against meta.json
        assert torch.equal(ckpt.model_state["w0"], torch.full((256, 256), float(ckpt.step)))
        assert all(p.name.startswith("step_") for p in list_checkpoints(run))
        start = ckpt.step + 1  # the next writer continues after the newest complete checkpoint
