"""3D on 8 CPU ranks, and sharded checkpoints' save and load time against the world size.

Part 1, layouts: the demo model (``configs/3d.toml``'s job) through ``loom train --nproc 8``
end to end in four layouts (dp 8; dp 2 x tp 2 x pp 2 with sp and ZeRO-1; dp 4 x tp 2 with
ZeRO-3; tp 2 x pp 4). Per layout: tokens/s (median over the steps after the first), rank 0's
state and activation bytes and its bytes per group per step, each beside the planner's
prediction (``loom.plan.report``). On 2 cores the 8 ranks time-share them: the tokens/s
say that the layouts run, not how fast they would on 8 devices.

Part 2, checkpoints: a larger model (``CKPT_JOB``, ~27M parameters: 0.3 GB of fp32 weights
and AdamW moments) saved and loaded by 1, 2, 4 and 8 ranks under ZeRO-3 (dp N; one rank:
without ZeRO), after one training step (so AdamW's moments exist), ``ROUNDS`` rounds each.
Save: ``Trainer.save`` between two barriers (every rank writes its shard, sha256 and fsync;
rank 0 the index); load: ``open_checkpoint`` (the shards' sha256 split over the ranks) and
the rank's own boxes read into its slices. Figures: the wall time until every rank is done,
and the busiest rank's CPU time (``time.process_time``), which is the work one rank does
whatever the sharing of cores: with 8 ranks on 2 cores the wall time cannot fall past 2
ranks. The page cache holds what was just written, so loads read memory, not the disk.

    python bench/3d.py --out bench/results/3d.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
from common import bench_command, result_head, write_result

from loom.config import config_from_dict, load_config
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.plan import report
from loom.plan.hardware import HARDWARE
from loom.train.metrics import read_metrics
from loom.train.sharded_checkpoint import open_checkpoint
from loom.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_JOB = {"train.steps": 12, "train.eval_every": 0, "train.ckpt_every": 1000, "train.sample_tokens": 0}
LAYOUTS = {
    "dp8": {"parallel.tp": 1, "parallel.pp": 1, "parallel.sequence_parallel": False, "zero.stage": 0},
    "dp2 tp2 pp2 (sp, 1F1B, ZeRO-1)": {},
    "dp4 tp2 ZeRO-3": {"parallel.pp": 1, "parallel.sequence_parallel": False, "zero.stage": 3},
    "tp2 pp4 (1F1B)": {"parallel.pp": 4, "parallel.sequence_parallel": False, "zero.stage": 0, "train.micro_batch": 1},
}
CKPT_JOB = {
    "model.n_layers": 8,
    "model.d_model": 512,
    "model.n_heads": 8,
    "train.seq_len": 64,
    "train.global_batch": 8,
    "train.micro_batch": 1,
    "train.steps": 1,
    "train.eval_every": 0,
    "train.sample_tokens": 0,
}
WORLDS = (1, 2, 4, 8)
ROUNDS = 5
MEMORY = ("params", "grads", "optim", "activations")


# ----------------------------------------------------------------------------- part 1


def train_layout(name: str, settings: dict, root: Path) -> tuple[dict, list[dict]]:
    run_dir = root / "".join(c if c.isalnum() else "_" for c in name)
    cmd = [sys.executable, "-m", "loom.cli", "train", "--config", str(ROOT / "configs" / "3d.toml")]
    cmd += ["--run-dir", str(run_dir), "--no-progress", "--nproc", "8"]
    for key, value in {**LAYOUT_JOB, **settings}.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text()), read_metrics(run_dir)


def layout_row(name: str, summary: dict, records: list[dict]) -> str:
    config = config_from_dict(summary["config"])
    prediction = report.predict_run(config, 8, HARDWARE["cpu"], "cpu", 0)
    tokens = config.batch(dp=prediction.layout.dp).global_batch * config.train.seq_len
    meas = report.measured(records, tokens)
    tok_s = statistics.median(r["tokens_per_s"] for r in records[1:])
    cells = [name, f"{tok_s:,.0f}"]
    for key in MEMORY:
        cells.append(f"{meas['memory'][key] / 2**20:.2f} / {getattr(prediction.memory, key) / 2**20:.2f}")
    for group in ("dp", "tp", "pp"):
        want, got = prediction.comm_bytes[group], meas["comm_bytes"][group] or 0.0
        cells.append(f"{got / 2**20:.2f} / {want / 2**20:.2f}" if want or got else "-")
    return "| " + " | ".join(cells) + " |"


# ----------------------------------------------------------------------------- part 2


def checkpoint_rank(items: list[str], run_dir: str, rounds: int) -> dict:
    """On every rank: save and load ``rounds`` times; the slowest rank's times (rank 0 returns them)."""
    config = load_config(None, items)
    ctx = init_distributed(config.parallel)
    trainer = Trainer(config, Path(run_dir), dist=ctx, live_progress=False)
    trainer.train_step(0)  # AdamW's moments exist from the first update on: save them too
    world = ctx.comm("world")
    saves, loads, cpu_saves, cpu_loads, written = [], [], [], [], 0
    for _ in range(rounds):
        world.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        path = trainer.save()
        cpu_saves.append(time.process_time() - cpu)
        world.barrier()
        saves.append(time.perf_counter() - start)
        shard = path / f"shard_{ctx.rank:05d}.safetensors"
        written = shard.stat().st_size if shard.exists() else 0
        world.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        checkpoint = open_checkpoint(path, world, ctx.device)
        trainer.update.load_pieces(checkpoint.tensors, path)
        checkpoint.tensors.close()
        cpu_loads.append(time.process_time() - cpu)
        world.barrier()
        loads.append(time.perf_counter() - start)
    mine = {"written": written, "cpu_save": cpu_saves, "cpu_load": cpu_loads}
    every = [None] * ctx.world_size if dist.is_initialized() else [mine]
    if dist.is_initialized():
        dist.all_gather_object(every, mine)
    ctx.shutdown()
    return {
        "save": saves,
        "load": loads,
        "written": [r["written"] for r in every],
        # the busiest rank's CPU seconds per round: the work one rank does, whatever the core sharing
        "cpu_save": [max(r["cpu_save"][i] for r in every) for i in range(rounds)],
        "cpu_load": [max(r["cpu_load"][i] for r in every) for i in range(rounds)],
    }


def checkpoint_row(world: int, root: Path) -> tuple[str, dict]:
    extra = {"zero.stage": 3} if world > 1 else {}
    items = [f"{k}={json.dumps(v)}" for k, v in {**CKPT_JOB, **extra}.items()]
    run_dir = root / f"ckpt{world}"
    if world == 1:
        found = checkpoint_rank(items, str(run_dir), ROUNDS)
    else:
        found = run_ranks(checkpoint_rank, world, args=(items, str(run_dir), ROUNDS), timeout_s=1800)[0]
    total = sum(found["written"])

    def cell(key: str) -> str:
        values = found[key]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    row = (
        f"| {world} | {'ZeRO-3' if world > 1 else 'none'} | {total / 2**20:.0f} | "
        f"{max(found['written']) / 2**20:.0f} | {cell('save')} | {cell('load')} | {cell('cpu_save')} | "
        f"{cell('cpu_load')} |"
    )
    spans = {
        key: (min(found[key]), statistics.median(found[key]), max(found[key])) for key in found if key != "written"
    }
    return row, spans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the tables here (markdown)")
    parser.add_argument("--skip-layouts", action="store_true", help="only the checkpoint part")
    args = parser.parse_args()
    layout_rows, ckpt_rows, times, spans = [], [], {}, {}
    with tempfile.TemporaryDirectory(prefix="loom-3d-") as tmp:
        if not args.skip_layouts:
            for name, settings in LAYOUTS.items():
                print(f"training {name} on 8 ranks", flush=True)
                layout_rows.append(layout_row(name, *train_layout(name, settings, Path(tmp))))
                print(layout_rows[-1], flush=True)
        for world in WORLDS:
            print(f"checkpoint save/load on {world} rank(s)", flush=True)
            row, spans[world] = checkpoint_row(world, Path(tmp))
            times[world] = {key: span[1] for key, span in spans[world].items()}
            ckpt_rows.append(row)
            print(row, flush=True)
    last = WORLDS[-1]

    def says(kind: str, what: str) -> str:
        """'falls' only where every doubling's rounds lie below the previous world's (no overlap)."""
        pairs = list(zip(WORLDS, WORLDS[1:]))
        medians = all(spans[b][kind][1] < spans[a][kind][1] for a, b in pairs)
        apart = all(spans[b][kind][2] < spans[a][kind][0] for a, b in pairs)
        verb = "falls" if apart else "falls in the median (rounds overlap: no claim)" if medians else "does not fall"
        return (
            f"{what} {verb} at every doubling ({times[1][kind]:.2f} s on 1 rank, {times[last][kind]:.2f} s on {last})"
        )

    verdict = [
        says("cpu_save", "The busiest rank's CPU time to save")
        + "; "
        + says("cpu_load", "to load")
        + ". Wall time (every rank done): "
        + says("save", "save")
        + ", "
        + says("load", "load")
        + ": 2 cores and one disk are shared by all the ranks here.",
    ]
    print("\n".join(verdict))

    def render(when: str) -> str:
        job = "configs/3d.toml with " + ", ".join(f"{k}={v}" for k, v in LAYOUT_JOB.items())
        head = result_head("3D on 8 CPU ranks; sharded checkpoints", bench_command("3d.py"), when, job)
        body = []
        if layout_rows:
            body += [
                "## Layouts through `loom train --nproc 8`",
                "",
                "Rank 0's figures, each cell measured / predicted (MiB; bytes per step for the groups).",
                "The 8 ranks share 2 cores: tokens/s show that a layout runs, not its speed on 8 devices.",
                "",
                "| layout | tokens/s | params | grads | optimizer | activations | dp bytes | tp bytes | pp bytes |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                *layout_rows,
                "",
            ]
        body += [
            "## Checkpoint save and load against the world size",
            "",
            "Job: " + ", ".join(f"{k}={v}" for k, v in CKPT_JOB.items()) + f"; {ROUNDS} rounds, median (range), "
            "wall seconds until every rank is done, and the busiest rank's CPU seconds. Loads read what the page "
            "cache holds.",
            "",
            "| ranks | ZeRO | MiB written | largest shard MiB | save s | load s | save CPU s | load CPU s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *ckpt_rows,
            "",
            *verdict,
            "",
        ]
        return "\n".join(head + body)

    write_result(args.out, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
