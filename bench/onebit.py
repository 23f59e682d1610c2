"""1-bit Adam and 0/1 Adam against AdamW: dp bytes, tokens/s and the loss curve, through ``loom train``.

The demo run (``configs/demo.toml``) for ``STEPS`` steps at 2 and 4 ranks (dp), with AdamW,
with ``optim.name = "onebit_adam"`` (its default warm-up: 15% of the steps), with 1-bit Adam
on ZeRO-1 (``zero.stage = 1``), and with 0/1 Adam (``zero_one_adam``: variance steps thinning
out up to step 45), once with DeepSpeed's local-step defaults (none in a run this short) and once
with local steps from step 106, their interval doubling every 60 steps up to 8. From each
run's ``metrics.jsonl`` (rank 0): dp bytes of a warm-up step and of a compressed step, the total
over the run and its ratio to AdamW's against the formula ``1 / (w + (1 - w) / 32)`` (w the
warm-up fraction; fp32 gradients), tokens/s (median over the steps after the first), and the
last training and validation losses. The 2-rank loss curves of both go to a PNG.

    python bench/onebit.py --out bench/results/onebit.md --plot bench/results/onebit_loss.png
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import bench_command, result_head, write_result

from loom.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 300
WARM = 0.15


VARIANTS = {  # name: (optimizer, zero stage, further settings)
    "adamw": ("adamw", 0, ()),
    "onebit_adam": ("onebit_adam", 0, ()),
    "onebit_zero1": ("onebit_adam", 1, ()),
    # DeepSpeed's defaults (local_step_scaler 32678: no local step in 300) and, scaled to this
    # run, local steps from step 106 on, their interval doubling every 60 steps up to 8
    "zero_one_adam": ("zero_one_adam", 0, ()),
    "zero_one_local": ("zero_one_adam", 0, ("optim.local_step_scaler=60", "optim.local_step_clipper=8")),
}
LABELS = {
    "adamw": "AdamW",
    "onebit_adam": "1-bit Adam",
    "onebit_zero1": "1-bit Adam, ZeRO-1",
    "zero_one_adam": "0/1 Adam",
    "zero_one_local": "0/1 Adam, local steps",
}


def run(variant: str, ranks: int, root: Path) -> list[dict]:
    optimizer, zero, settings = VARIANTS[variant]
    run_dir = root / f"{variant}-{ranks}"
    cmd = [sys.executable, "-m", "loom.cli", "train", "--config", str(ROOT / "configs" / "demo.toml")]
    cmd += ["--run-dir", str(run_dir), "--no-progress", "--nproc", str(ranks)]
    for item in (
        f"train.steps={STEPS}",
        f"train.eval_every={STEPS // 3}",
        "train.ckpt_every=0",
        "train.sample_tokens=0",
        *settings,
    ):
        cmd += ["--set", item]
    cmd += ["--set", f'optim.name="{optimizer}"', "--set", f"zero.stage={zero}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{optimizer} on {ranks} ranks failed:\n{done.stderr[-2000:]}")
    return read_metrics(run_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    parser.add_argument("--plot", type=Path, help="write the 2-rank loss curves here (PNG)")
    args = parser.parse_args()
    freeze = max(1, round(WARM * STEPS))
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="loom-onebit-") as tmp:
        for ranks in (2, 4):
            for variant in VARIANTS:
                print(f"{variant} on {ranks} ranks", flush=True)
                runs[(variant, ranks)] = run(variant, ranks, Path(tmp))
    rows, verdict = [], []
    w = freeze / STEPS
    formula = 1 / (w + (1 - w) / 32)
    for ranks in (2, 4):
        adam, onebit = runs[("adamw", ranks)], runs[("onebit_adam", ranks)]
        total_adam = sum(r["comm_bytes_dp"] for r in adam)
        total_onebit = sum(r["comm_bytes_dp"] for r in onebit)
        compressed_step = onebit[-1]["comm_bytes_dp"]
        for variant in VARIANTS:
            recs = runs[(variant, ranks)]
            name, total = LABELS[variant], sum(r["comm_bytes_dp"] for r in recs)
            speed = statistics.median(r["tokens_per_s"] for r in recs[1:])
            val = [r["val_loss"] for r in recs if "val_loss" in r]
            if name == "AdamW":
                step_bytes = f"{recs[-1]['comm_bytes_dp'] / 2**20:.3f}"
            elif variant.startswith("zero_one"):  # full, compressed or sync, local: each kind's median
                kinds = {}
                for r in recs:
                    kinds.setdefault(r["dp_phase"], []).append(r["comm_bytes_dp"])
                step_bytes = ", ".join(
                    f"{len(kinds[k])} {k} {statistics.median(kinds[k]) / 2**20:.4g}"
                    for k in ("full", "compressed", "sync", "local")
                    if k in kinds
                )
            else:
                step_bytes = (
                    f"{recs[freeze // 2]['comm_bytes_dp'] / 2**20:.3f} then {recs[-1]['comm_bytes_dp'] / 2**20:.4f}"
                )
            rows.append(
                f"| {ranks} | {name} | {step_bytes} | {total / 2**20:.1f} | {speed:,.0f} | "
                f"{recs[-1]['loss']:.3f} | {val[-1]:.3f} |"
            )
        ratio = total_adam / total_onebit
        verdict.append(
            f"{ranks} ranks: AdamW sends {ratio:.2f}x the dp bytes of 1-bit Adam over the run (formula for "
            f"{w:.0%} warm-up, fp32 gradients: {formula:.2f}x); a compressed step sends "
            f"{compressed_step / runs[('adamw', ranks)][-1]['comm_bytes_dp']:.4f} of an AdamW step's (1/32 = 0.0313); "
            f"last validation loss {[r['val_loss'] for r in onebit if 'val_loss' in r][-1]:.3f} against AdamW's "
            f"{[r['val_loss'] for r in adam if 'val_loss' in r][-1]:.3f}; with ZeRO-1 "
            f"{[r['val_loss'] for r in runs[('onebit_zero1', ranks)] if 'val_loss' in r][-1]:.3f}, its compressed "
            f"step {runs[('onebit_zero1', ranks)][-1]['comm_bytes_dp'] / adam[-1]['comm_bytes_dp']:.4f} of AdamW's."
            + "".join(
                f" {LABELS[v]}: AdamW sends {total_adam / sum(r['comm_bytes_dp'] for r in runs[(v, ranks)]):.2f}x "
                f"its dp bytes, last validation loss {[r['val_loss'] for r in runs[(v, ranks)] if 'val_loss' in r][-1]:.3f}."
                for v in ("zero_one_adam", "zero_one_local")
            )
        )
    print("\n".join(rows + verdict))
    if args.plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for variant, label in LABELS.items():
            recs = runs[(variant, 2)]
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=label, linewidth=1)
        ax.axvline(freeze, color="grey", linestyle="--", linewidth=0.8, label=f"freeze_step = {freeze}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("demo model, 2 ranks: AdamW, 1-bit Adam and 0/1 Adam")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")

    def render(when: str) -> str:
        job = (
            f"configs/demo.toml, {STEPS} steps, dp 2 and 4, 1-bit Adam's freeze_step and 0/1 Adam's "
            f"var_freeze_step {freeze} ({w:.0%}); 0/1 Adam with local steps: local_step_scaler 60, local_step_clipper 8"
        )
        head = result_head("1-bit Adam and 0/1 Adam against AdamW", bench_command("onebit.py"), when, job)
        table = [
            "| ranks | optimizer | dp MiB a step (0/1 Adam: steps of each kind, median MiB) | dp MiB in all | "
            "tokens/s | last loss | last val loss |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            *verdict,
            "",
            "The loss curves: `bench/results/onebit_loss.png`.",
            "",
        ]
        return "\n".join(head + table)

    write_result(args.out, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
