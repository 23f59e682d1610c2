"""The ``loom`` command's arguments: one sub-parser per command, with the examples users see
under ``loom --help``."""

from __future__ import annotations

import argparse
from pathlib import Path

from loom.parallel.pipeline.schedules import SCHEDULES
from loom.parallel.pipeline.simulate import TIMELINE_FILE

EPILOG = """examples:
  loom train                                   train the tiny demo GPT on the Python stdlib
  loom train --config configs/demo.toml --set train.steps=50 --run-dir runs/quick
  loom train --run-dir runs/quick --resume     continue from the newest checkpoint
  loom generate runs/quick --prompt "def main(" --tokens 200
  loom plot runs/quick                         write runs/quick/loss.png
  loom convert --from-hf ./gpt2-folder --out runs/gpt2
  loom tokenizer train --corpus ./texts --vocab-size 4096 --out tok/tokenizer.json
  loom train --nproc 4 --run-dir runs/pp --set parallel.pp=2 --set parallel.tp=2
  loom schedule --schedule interleaved_1f1b --pp 4 --vp 2 --microbatches 8 --out chart.png
  loom attention-layout --kind bigbird --seq-len 4096 --param num_random_blocks=2 --out layout.png
  loom plan --model llama-70b --gpus 256 --gpu h100-sxm --seq-len 4096 --global-batch 1024
  loom plan --run runs/quick                   a run's predicted memory, traffic and time beside its measures
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom",
        description="Train GPT-2 and Llama style language models, on one CPU or many devices.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="train a model (default: tiny GPT on the Python standard library)",
        description="Train a model. With no arguments: the tiny demo GPT on the Python "
        "standard library source of this machine, a few minutes on 2 CPU cores.",
    )
    _add_config_args(train)
    train.add_argument("--run-dir", type=Path, help="folder for metrics, checkpoints, plots (default: runs/<time>)")
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="PATH",
        help="continue from the newest checkpoint of --run-dir, or from checkpoint PATH",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar (plain log lines)")
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="with --nproc: after a rank fails, restart every rank from the newest checkpoint, at most K times",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="start N local ranks (gloo on CPU, nccl on GPUs); under torchrun leave it out",
    )

    gen = sub.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Sample text from a checkpoint (a checkpoint folder, or a run folder: its newest).",
    )
    gen.add_argument("checkpoint", type=Path, help="checkpoint folder or run folder")
    gen.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    gen.add_argument("--tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: %(default)s)")
    gen.add_argument(
        "--top-k", type=int, default=40, help="sample among the k likeliest, 0 for all (default: %(default)s)"
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    gen.add_argument("--tokenizer", help="byte or a tokenizer.json (default: the one the checkpoint names)")

    conv = sub.add_parser(
        "convert",
        help="import or export Hugging Face checkpoints, consolidate sharded ones",
        description="Convert between a local Hugging Face folder (config.json + safetensors) "
        "and a loom checkpoint (GPT-2 and Llama families), or consolidate a sharded loom "
        "checkpoint into one model.safetensors: loom convert CKPT --to safetensors --out DIR.",
    )
    conv.add_argument("checkpoint", nargs="?", type=Path, help="loom checkpoint or run folder (with --to)")
    conv.add_argument("--to", choices=("safetensors", "hf"), help="what to turn CHECKPOINT into")
    way = conv.add_mutually_exclusive_group()
    way.add_argument("--from-hf", type=Path, metavar="DIR", help="Hugging Face folder to import")
    way.add_argument("--to-hf", type=Path, metavar="CKPT", help="loom checkpoint or run folder to export")
    conv.add_argument("--out", type=Path, required=True, help="output folder")

    lay = sub.add_parser(
        "attention-layout",
        help="draw a block-sparse attention layout and print its density",
        description="Build a block-sparse attention layout (loom.sparsity; DeepSpeed's parameter names) for a "
        "sequence length, print its density per head against dense causal attention, and draw it.",
    )
    lay.add_argument(
        "--kind",
        default="fixed",
        help="dense, fixed, strided, sliding_window, bslongformer, longformer, "
        "bigbird, variable (default: %(default)s)",
    )
    lay.add_argument("--seq-len", type=int, default=1024, help="(default: %(default)s)")
    lay.add_argument("--heads", type=int, default=4, help="(default: %(default)s)")
    lay.add_argument("--block", type=int, default=16, help="(default: %(default)s)")
    lay.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another layout parameter, e.g. num_random_blocks=2 or local_window_blocks=[2,4] (repeatable)",
    )
    lay.add_argument("--out", type=Path, help="PNG path (default: layout_<kind>_<seq-len>.png)")

    tok = sub.add_parser("tokenizer", help="train a BPE tokenizer", description="Tokenizer tools.")
    tok_sub = tok.add_subparsers(dest="tok_command", metavar="ACTION", required=True)
    tok_train = tok_sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on a corpus",
        description="Train a byte-level BPE tokenizer (Hugging Face tokenizers) on a "
        "corpus; use it with --set data.tokenizer=PATH.",
    )
    tok_train.add_argument(
        "--corpus", default="stdlib", help="stdlib or a folder of .txt/.jsonl (default: %(default)s)"
    )
    tok_train.add_argument("--vocab-size", type=int, default=4096, help="(default: %(default)s)")
    tok_train.add_argument("--max-bytes", type=int, default=0, help="read at most this much text, 0 for all")
    tok_train.add_argument("--out", type=Path, required=True, help="where to write tokenizer.json")

    plot = sub.add_parser("plot", help="plot a run's loss curve", description="Write the loss curve of a run as PNG.")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/loss.png)")

    show = sub.add_parser(
        "config",
        help="print the resolved config as TOML",
        description="Print the config that `loom train` would use, every field resolved.",
    )
    _add_config_args(show)

    sub.add_parser("presets", help="list model presets", description="List model presets and their sizes.")

    sched = sub.add_parser(
        "schedule",
        help="simulate and draw a pipeline schedule (bubble, activations held)",
        description="Simulate a pipeline schedule from its per-rank action lists and per-action costs, and draw "
        "its timeline, one row per device, like the Megatron-LM paper's figures. Costs are per chunk: "
        "with --vp 2 a chunk holds half the layers of a --vp 1 stage. With --from-run, draw a finished "
        f"run's measured timeline instead, read from RUN_DIR/{TIMELINE_FILE}: "
        '{"ranks": [[{"kind": "F", "microbatch": 0, "chunk": 0, "start": 0.0, "end": 0.1}, ...], '
        "...]}, "
        "one list per pp rank, kind F/B/I/W, times in seconds.",
    )
    sched.add_argument("--schedule", metavar="NAME", help=f"{', '.join(SCHEDULES)} (default: 1f1b)")
    sched.add_argument("--pp", type=int, metavar="N", help="pipeline ranks (default: 4)")
    sched.add_argument(
        "--vp", type=int, metavar="N", help="virtual chunks per rank, interleaved_1f1b only (default: 1)"
    )
    sched.add_argument("--microbatches", type=int, metavar="N", help="micro-batches per step (default: 8)")
    sched.add_argument("--forward-cost", type=float, metavar="T", help="time of one forward of one chunk (default: 1)")
    sched.add_argument(
        "--backward-cost", type=float, metavar="T", help="time of one full backward of one chunk (default: 2)"
    )
    sched.add_argument(
        "--weight-cost",
        type=float,
        metavar="T",
        help="the weight-gradient part of the backward, for zero_bubble (default: half of it)",
    )
    sched.add_argument(
        "--transfer-cost", type=float, metavar="T", help="time from a send to the data's arrival (default: 0)"
    )
    sched.add_argument(
        "--out",
        type=Path,
        metavar="PNG",
        help="PNG path (default: schedule_<name>_pp<P>_vp<V>_m<M>.png, "
        f"or RUN_DIR/{Path(TIMELINE_FILE).with_suffix('.png')} with --from-run)",
    )
    sched.add_argument("--json", action="store_true", help="print the numbers as JSON; draw only if --out is given")
    sched.add_argument(
        "--from-run",
        type=Path,
        metavar="RUN_DIR",
        help="draw the measured timeline of this pipeline run instead of a simulation",
    )
    pl = sub.add_parser(
        "plan",
        help="predict memory, traffic and step time of every layout, or of a run",
        description="Enumerate the valid layouts (dp, tp, pp, vp, schedule, ZeRO stage, sp, recompute, "
        "micro-batch) of a model on N devices, drop those that do not fit in a device's memory, and rank "
        "the rest by predicted step time (loom.plan's models: Korthikanti's activations, ZeRO's states, "
        "alpha-beta links, the pipeline bubble). With --run, print a run's prediction beside what it "
        "measured; with --calibrate, fit this machine's compute rate from a run.",
    )
    pl.add_argument("--model", default="tiny", metavar="PRESET", help="model preset (default: tiny; see loom presets)")
    pl.add_argument("--gpus", type=int, default=1, metavar="N", help="devices (default: 1)")
    pl.add_argument(
        "--gpu",
        default="h100-sxm",
        metavar="NAME",
        help="h100-sxm (default), h200, a100-80gb, cpu, or one of --hardware-file",
    )
    pl.add_argument("--hardware-file", type=Path, metavar="TOML", help="more devices: one [name] table each")
    pl.add_argument("--seq-len", type=int, metavar="S", help="tokens per sequence (default: the model's max_seq_len)")
    pl.add_argument(
        "--global-batch", type=int, default=None, metavar="B", help="sequences per step (default: 8 per device)"
    )
    pl.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="default: bf16")
    pl.add_argument("--top", type=int, default=5, metavar="K", help="layouts to print (default: 5)")
    pl.add_argument("--explain", type=int, metavar="K", help="detail the K-th layout of the ranking")
    pl.add_argument("--json", action="store_true", help="print JSON for tools")
    pl.add_argument("--run", type=Path, metavar="RUN_DIR", help="a run's prediction beside its measurements")
    pl.add_argument(
        "--calibrate",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="fit the compute rate on a run without tp or pp traffic or recomputation (and a CPU host's thread "
        "efficiency on one with more threads per process), recomputation's cost on runs that recompute, the link "
        "bandwidth on runs with tp or pp traffic; writes hardware.toml into the first RUN_DIR",
    )
    pl.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model field, e.g. --set model.n_layers=48 (repeatable)",
    )
    return parser


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (sections [model], [train], [data])")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=3e-4 (repeatable)",
    )
