"""Faults, by trial: ranks killed or stopped mid-run, and saves killed mid-write.

Restart trials: a small ``loom train`` job (2 layers, 40 steps, a checkpoint every 5 steps,
``parallel.timeout_s`` 10 s) runs with ``--max-restarts 1`` on 2 ranks, on 4 ranks, and on two
"nodes" of 2 ranks (two ``torchrun`` invocations joined through a c10d rendezvous on loopback).
Each trial sends SIGKILL or SIGSTOP to a random rank at a random step and records:

- the seconds from the fault until every rank of that attempt has exited (goal: within
  ``parallel.timeout_s`` + 10 s);
- whether a survivor's ``failure_rank*.txt`` names the dead rank and the operation it waited in;
- whether the restarted run's loss at every step equals the uninterrupted run's (rel 1e-5).

Save trials: a writer saves sharded checkpoints (``save_sharded``, 12 MB each) in a loop and is
SIGKILLed at a random moment, 20 times; after each kill the newest complete checkpoint must load
with its checksums verified and hold the step it names, and no partial folder may look like a
checkpoint. Then a shard of the newest is corrupted (one byte) and another truncated: loading
each must fail with a message naming the file.

    python bench/faults.py --out bench/results/faults.md
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import bench_command, result_head, write_result

from loom.errors import LoomError
from loom.train.checkpoint import latest_checkpoint, list_checkpoints
from loom.train.metrics import read_metrics
from loom.train.sharded_checkpoint import open_checkpoint

STEPS, CKPT_EVERY, TIMEOUT_S = 40, 5, 10.0
ITEMS = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.max_seq_len=64",
    "train.seq_len=64",
    "train.micro_batch=4",
    "train.global_batch=16",
    f"train.steps={STEPS}",
    "train.warmup_steps=4",
    "train.eval_every=0",
    f"train.ckpt_every={CKPT_EVERY}",
    "train.sample_tokens=0",
    f"parallel.timeout_s={TIMEOUT_S}",
]
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", "recv", "barrier", "all_to_all")


# ----------------------------------------------------------------------------- one job


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sets() -> list[str]:
    return [arg for item in ITEMS for arg in ("--set", item)]


def start(layout: str, run_dir: Path, restarts: int) -> list[subprocess.Popen]:
    """The job's launcher processes: one ``loom train --nproc`` or two torchrun "nodes"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["train", "--run-dir", str(run_dir), "--no-progress", *_sets()]
    if layout in ("2 ranks", "4 ranks"):
        nproc = layout.split()[0]
        cmd = [sys.executable, "-m", "loom.cli", *train, "--nproc", nproc, "--max-restarts", str(restarts)]
        return [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = []
    for _ in range(2):  # the rendezvous numbers the nodes
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2"]
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_dir.name]
        cmd += ["--max-restarts", str(restarts), "--monitor-interval", "0.2", "-m", "loom.cli", *train]
        nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return nodes


def ranks_of(launchers: list[subprocess.Popen]) -> dict[int, int]:
    """RANK -> pid of the rank processes under the launchers, now."""
    found = {}
    for launcher in launchers:
        try:
            children = psutil.Process(launcher.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                env, cmd = child.environ(), " ".join(child.cmdline())
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if "RANK" in env and "loom.cli" in cmd and "torch.distributed.run" not in cmd:
                found[int(env["RANK"])] = child.pid
    return found


def losses(run_dir: Path) -> dict[int, float]:
    if not (run_dir / "metrics.jsonl").exists():
        return {}
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def finish(launchers: list[subprocess.Popen], timeout: float = 600) -> tuple[bool, str]:
    ok, errors = True, []
    for launcher in launchers:
        _, err = launcher.communicate(timeout=timeout)
        ok &= launcher.returncode == 0
        errors.append(err or "")
    return ok, "\n".join(errors)


def clean_run(layout: str, root: Path) -> dict[int, float]:
    run_dir = root / f"clean-{layout.replace(' ', '-')}"
    ok, err = finish(start(layout, run_dir, restarts=0))
    if not ok:
        raise RuntimeError(f"the clean {layout} run failed:\n{err[-3000:]}")
    return losses(run_dir)


# ----------------------------------------------------------------------------- restart trials


def trial(index: int, layout: str, fault: str, rng: random.Random, root: Path, clean: dict[int, float]) -> dict:
    run_dir = root / f"trial-{index:02d}"
    world = 2 if layout == "2 ranks" else 4
    victim, at_step = rng.randrange(world), rng.randrange(3, STEPS - 5)
    launchers = start(layout, run_dir, restarts=1)
    deadline = time.monotonic() + 300
    while len(losses(run_dir)) < at_step:
        if time.monotonic() > deadline or any(p.poll() is not None for p in launchers):
            finish(launchers, 60)
            return {"index": index, "layout": layout, "fault": fault, "error": "the run ended before the fault"}
        time.sleep(0.02)
    pids = ranks_of(launchers)
    os.kill(pids[victim], signal.SIGKILL if fault == "SIGKILL" else signal.SIGSTOP)
    faulted = time.monotonic()
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids.values()):
        time.sleep(0.05)
    out_s = time.monotonic() - faulted
    ok, err = finish(launchers)
    reports = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(run_dir.glob("failure_rank*.txt"))]
    names_rank = any(f"rank {victim} (pid {pids[victim]}" in r for r in reports)
    names_op = any(any(op in r for op in COLLECTIVES) for r in reports)
    got = losses(run_dir)
    matched = ok and sorted(got) == sorted(clean) and all(abs(got[s] - clean[s]) <= 1e-5 * abs(clean[s]) for s in clean)
    return {
        "index": index,
        "layout": layout,
        "fault": fault,
        "victim": victim,
        "step": at_step,
        "out_s": out_s,
        "named": names_rank and names_op,
        "matched": matched,
        "error": "" if ok else err.strip().splitlines()[-1][:200],
    }


# ----------------------------------------------------------------------------- save trials

WRITER = """
import sys, torch
from pathlib import Path
from loom.distributed.comm import Comm
from loom.distributed.ledger import Ledger
from loom.parallel.pieces import Piece
from loom.train.sharded_checkpoint import save_sharded
run, start = Path(sys.argv[1]), int(sys.argv[2])
comm = Comm("world", None, [0], Ledger(0))
for step in range(start, start + 1000):
    halves = [(0, 0), (128, 0)]  # each tensor in two pieces, as two ranks would write it
    pieces = [Piece(f"model/w{i}", (256, 256), at, torch.full((128, 256), float(step))) for i in range(48) for at in halves]
    save_sharded(run, step, pieces, {"step": step}, {"note": "kill test"}, keep=2, comm=comm)
    print(step, flush=True)
"""


def save_trials(root: Path, rng: random.Random, count: int) -> list[str]:
    import torch

    run = root / "saves"
    start_step, held = 1, 0
    for _ in range(count):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(run), str(start_step)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        proc.stdout.readline()  # one save done: from here on, kill anywhere
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        newest = latest_checkpoint(run)
        ckpt = open_checkpoint(newest)  # verifies every file's sha256 against meta.json
        value = ckpt.tensors.full("model/w0")
        ckpt.tensors.close()
        partial = [p.name for p in list_checkpoints(run) if not p.name.startswith("step_")]
        held += torch.equal(value, torch.full((256, 256), float(ckpt.step))) and not partial
        start_step = ckpt.step + 1
    lines = [f"{held}/{count} kills left a newest checkpoint that loads, verified, holding its own step"]
    newest = latest_checkpoint(run)
    for damage in ("corrupted", "truncated"):
        copy = root / f"{damage}" / newest.name
        shutil.copytree(newest, copy)
        shard = sorted(copy.glob("shard_*.safetensors"))[0]
        data = bytearray(shard.read_bytes())
        if damage == "corrupted":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        shard.write_bytes(bytes(data))
        try:
            open_checkpoint(copy)
            lines.append(f"a {damage} shard: NOT detected")
        except LoomError as exc:
            lines.append(f"a {damage} shard: detected: `{exc.problem[:160]}`")
    return lines


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=20, help="restart trials (spread over the layouts)")
    parser.add_argument("--saves", type=int, default=20, help="kills during saves")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    layouts = ["2 ranks", "4 ranks", "2 nodes x 2 ranks"]
    plan = [(layouts[i % 3], "SIGKILL" if (i // 3) % 2 == 0 else "SIGSTOP") for i in range(args.trials)]
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="loom-faults-") as tmp:
        root = Path(tmp)
        clean = {layout: clean_run(layout, root) for layout in layouts}
        for i, (layout, fault) in enumerate(plan):
            result = trial(i, layout, fault, rng, root, clean[layout])
            results.append(result)
            print(result, flush=True)
            if "out_s" not in result:
                rows.append(f"| {i + 1} | {layout} | {fault} | - | - | - | - | - | {result['error']} |")
                continue
            rows.append(
                f"| {i + 1} | {layout} | {fault} | {result['victim']} | {result['step']} | {result['out_s']:.1f} | "
                f"{'yes' if result['named'] else 'no'} | {'yes' if result['matched'] else 'no'} | {result['error']} |"
            )
        saves = save_trials(root, rng, args.saves)
    done = [r for r in results if "out_s" in r]
    in_time = sum(r["out_s"] <= TIMEOUT_S + 10 for r in done)
    summary = [
        f"Every rank out within parallel.timeout_s + 10 s = {TIMEOUT_S + 10:g} s: {in_time}/{len(results)} "
        f"(longest {max((r['out_s'] for r in done), default=float('nan')):.1f} s).",
        f"The failure file names the dead rank and the operation: {sum(r['named'] for r in done)}/{len(results)}.",
        f"The restarted run matches the uninterrupted one at every step: {sum(r['matched'] for r in done)}/"
        f"{len(results)}.",
        *[f"Saves: {line}." for line in saves],
    ]
    print("\n".join(summary))

    def render(when: str) -> str:
        job = (
            f"2 layers of 64, {STEPS} steps, a checkpoint every {CKPT_EVERY}, parallel.timeout_s = {TIMEOUT_S:g}, "
            f"--max-restarts 1; seed {args.seed}"
        )
        head = result_head("Faults by trial", bench_command("faults.py"), when, job)
        table = [
            "| trial | layout | fault | rank | at step | s to all out | file names rank and op | curve matched | error |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            *summary,
            "",
        ]
        return "\n".join(head + table)

    write_result(args.out, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
