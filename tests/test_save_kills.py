"""A process killed (SIGKILL) at random points while it writes checkpoints, again and again, never
leaves a partial checkpoint that ``--resume`` would pick: the newest complete one always loads,
its checksums verified, and it holds the state that step wrote."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from loom.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

WRITER = """
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


def test_kills_during_saves_never_leave_a_partial_checkpoint_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rng = random.Random(0)
    start = 1
    for trial in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(run), str(start)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
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
