"""The ``loom`` command: train, generate, convert, tokenizer, plot, config, presets.

Every user mistake surfaces as a :class:`LoomError`: printed as one paragraph (problem,
then fix) on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from loom.errors import LoomError
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "train": cmd_train,
        "generate": cmd_generate,
        "convert": cmd_convert,
        "tokenizer": cmd_tokenizer,
        "plot": cmd_plot,
        "config": cmd_config,
        "presets": cmd_presets,
        "schedule": cmd_schedule,
        "attention-layout": cmd_attention_layout,
        "plan": cmd_plan,
    }[args.command]
    try:
        return handler(args) or 0
    except LoomError as err:
        print(f"loom: error: {err.problem}\n  fix: {err.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loom: interrupted; the newest complete checkpoint is intact (resume with --resume).", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from loom.distributed.context import env_world_size, threads_per_rank
    from loom.parallel.host_allocator import set_host_allocator

    world_size = env_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world_size > 1 else max(1, args.nproc)
    # before this process's first tensor (torch reads its huge-page switch there); ranks inherit it
    set_host_allocator(threads_per_rank(local))
    if world_size > 1 and args.run_dir is None:
        raise LoomError(
            "launched on several ranks without --run-dir.",
            "pass --run-dir DIR so every rank writes to the same run folder.",
        )
    run_dir = args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    attempt = _elastic_attempt(world_size)
    resume_from, config = _train_config(args, run_dir, attempt.number if attempt is not None else 0)
    if args.nproc < 1:
        raise LoomError(f"--nproc {args.nproc} must be at least 1.", "pass --nproc 1 or more.")
    if args.max_restarts < 0:
        raise LoomError(f"--max-restarts {args.max_restarts} must not be negative.", "pass --max-restarts 0 or more.")
    launching = args.nproc > 1 and world_size == 1
    if config.train.memory_check:  # before any process starts: the planner's bytes against the machine's
        local = args.nproc if launching else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        _check_memory(config, args.nproc if launching else world_size, local)
    if launching:
        return _launch(args, config, run_dir)
    return _train_rank(args, config, run_dir, resume_from, attempt)


def _elastic_attempt(world_size: int):  # noqa: ANN202 (an Attempt: distributed is imported lazily)
    """Under an elastic agent, which start of the job this rank belongs to (``Attempt``)."""
    if world_size == 1:
        return None
    from loom.distributed.context import Attempt

    return Attempt.join()


def _check_memory(config, world: int, local: int) -> None:
    """Refuse a run the planner says cannot fit this machine (``loom.plan.fit``)."""
    import dataclasses

    import torch

    from loom.plan.fit import check_fits
    from loom.plan.hardware import hardware_of
    from loom.plan.report import predict_run
    from loom.train.tokenizer import load_tokenizer

    cuda = (
        torch.cuda.is_available() and config.train.device in ("auto", "cuda") or config.train.device.startswith("cuda")
    )
    device = "cuda" if cuda else "cpu"
    vocab = config.model.vocab_size or load_tokenizer(config.data.tokenizer).vocab_size
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
    name = torch.cuda.get_device_name(0) if cuda else ""
    prediction = predict_run(config, world, hardware_of(device, name, local), device)
    device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    check_fits(prediction, local, device, device_bytes, host_bytes)


def _train_config(args: argparse.Namespace, run_dir: Path, attempt: int = 0):
    """The checkpoint to resume from (or None) and the validated config. ``attempt`` > 0: the job's
    ranks were restarted after a failure, so it goes on from the run folder's newest checkpoint."""
    from loom.config import load_config, resume_config
    from loom.train.checkpoint import checkpoint_meta, latest_checkpoint

    resume_from = None
    say = os.environ.get("RANK", "0") == "0"
    if attempt and latest_checkpoint(run_dir) is not None:  # restarted after a failure: go on from the newest
        resume_from = latest_checkpoint(run_dir)
        if say:
            print(f"loom: restart {attempt}: resuming from {resume_from}", file=sys.stderr)
    elif attempt and args.resume is None:
        if say:
            print(f"loom: restart {attempt}: no checkpoint yet, starting again", file=sys.stderr)
    elif args.resume == "latest":
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise LoomError(
                f"--resume was given but {run_dir} holds no complete checkpoint.",
                "drop --resume to start fresh, or pass --resume PATH of a checkpoint.",
            )
    elif args.resume:
        resume_from = Path(args.resume)
    elif latest_checkpoint(run_dir) is not None:
        raise LoomError(
            f"{run_dir} already holds checkpoints of an earlier run.",
            "pass --resume to continue it, or choose a new --run-dir.",
        )
    if resume_from is not None and args.config is None:
        # Resuming without a config file: the checkpoint's config, with --set on top.
        meta = checkpoint_meta(resume_from)
        return resume_from, resume_config(meta["config"], meta.get("batch"), args.overrides)
    return resume_from, load_config(args.config, args.overrides)


def _launch(args: argparse.Namespace, config, run_dir: Path) -> int:
    """Validate the layout for --nproc ranks, then start them, each running this command."""
    from loom.config import check_launch
    from loom.distributed.launch import launch_local

    check_launch(config, args.nproc)
    argv = ["train", "--run-dir", str(run_dir), "--no-progress"]
    if args.config is not None:
        argv += ["--config", str(args.config)]
    if args.resume:
        argv += ["--resume", str(args.resume)]
    for item in args.overrides:
        argv += ["--set", item]
    launch_local(args.nproc, argv, max_restarts=args.max_restarts)
    return 0


def _train_rank(args: argparse.Namespace, config, run_dir: Path, resume_from: Path | None, attempt=None) -> int:  # noqa: ANN001
    from loom.distributed.context import init_distributed
    from loom.distributed.watchdog import Heartbeats, fail_loudly
    from loom.train.trainer import Trainer

    dist_ctx = init_distributed(config.parallel, config.train.device, attempt)
    console = _console()
    several = dist_ctx.world_size > 1
    beats = Heartbeats.connect(dist_ctx.rank, dist_ctx.world_size, attempt.keys() if attempt is not None else None)
    with fail_loudly(dist_ctx.ledger, config.parallel.timeout_s, run_dir if several else None, beats):
        trainer = Trainer(
            config, run_dir, resume_from=resume_from, console=console, live_progress=not args.no_progress, dist=dist_ctx
        )
        summary = trainer.run()
        if dist_ctx.is_main:
            _finish_run(trainer, summary, console)
    dist_ctx.shutdown()  # only on success: after a failure the peers may be gone
    return 0


def _finish_run(trainer, summary: dict, console) -> None:
    """Rank 0 alone: plot, summary lines, and a sample from the final weights."""
    from loom.train.checkpoint import latest_checkpoint
    from loom.train.generate import generate, load_for_inference
    from loom.viz.plot import plot_loss

    plot_path = plot_loss(trainer.run_dir)
    val = summary["final_val_loss"]
    console.print(
        f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, final loss {summary['final_loss']:.4f}"
        + (f", validation loss {val:.4f}" if val is not None else "")
        + f", {summary['tokens_per_s']:,.0f} tokens/s"
    )
    console.print(f"run folder: {trainer.run_dir}  (metrics.jsonl, summary.json, checkpoints/, tensorboard/)")
    console.print(f"loss plot: {plot_path}")
    train = trainer.config.train
    if train.sample_tokens:
        tok = trainer.tokenizer
        model = trainer.model
        if trainer.tp.size > 1 or trainer.pp.size > 1:  # a shard or a stage cannot run alone:
            # sample from the full final checkpoint (always written at the last step)
            model = load_for_inference(latest_checkpoint(trainer.run_dir), str(trainer.device))[0]
        ids = generate(
            model,
            tok.encode(train.sample_prompt),
            train.sample_tokens,
            trainer.config.model.max_seq_len,
            seed=train.seed,
        )
        text = train.sample_prompt + tok.decode(ids)
        (trainer.run_dir / "sample.txt").write_text(text, encoding="utf-8")
        console.rule("sample")
        console.print(text, markup=False, highlight=False)
        console.rule()


def cmd_generate(args: argparse.Namespace) -> int:
    from loom.train.generate import generate, load_for_inference

    model, config, tokenizer = load_for_inference(args.checkpoint, args.device, args.tokenizer)
    ids = generate(
        model,
        tokenizer.encode(args.prompt),
        args.tokens,
        config.model.max_seq_len,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        stop_id=tokenizer.eos_id,
    )
    print(args.prompt + tokenizer.decode(ids))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from loom.train.convert import consolidate, export_hf, import_hf

    given = [
        name
        for name, on in (
            ("CHECKPOINT --to", args.checkpoint or args.to),
            ("--from-hf", args.from_hf),
            ("--to-hf", args.to_hf),
        )
        if on
    ]
    if len(given) != 1 or (args.to is None) != (args.checkpoint is None):
        raise LoomError(
            f"loom convert needs one conversion, got {', '.join(given) or 'none'}.",
            "give one of: CHECKPOINT --to safetensors|hf, --from-hf DIR, --to-hf CKPT (and --out DIR).",
        )
    if args.to == "safetensors":
        path = consolidate(args.checkpoint, args.out)
        print(f"consolidated {args.checkpoint} -> {path / 'model.safetensors'} (a single-file loom checkpoint)")
        return 0
    if args.to == "hf":
        args.to_hf = args.checkpoint
    if args.from_hf:
        path = import_hf(args.from_hf, args.out)
        print(f"imported {args.from_hf} -> loom checkpoint {path}")
    else:
        path = export_hf(args.to_hf, args.out)
        print(f"exported {args.to_hf} -> Hugging Face folder {path}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from loom.train.tokenizer import train_tokenizer

    tok = train_tokenizer(args.corpus, args.vocab_size, args.out, max_bytes=args.max_bytes)
    print(f"trained a {tok.vocab_size}-token BPE tokenizer -> {args.out}\nuse it with: --set data.tokenizer={args.out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from loom.viz.plot import plot_loss

    print(plot_loss(args.run_dir, args.out))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from loom.config import load_config

    config = load_config(args.config, args.overrides)

    def table(name: str, values: dict) -> None:
        print(f"[{name}]")
        for key, value in values.items():
            if value is None:
                print(f"# {key} = (derived)")
            elif not isinstance(value, dict):
                print(f"{key} = {_toml_value(value)}")
        print()
        for key, value in values.items():
            if isinstance(value, dict):  # a nested table ([model.sparse_attention]) after its section's keys
                table(f"{name}.{key}", value)

    for section, values in config.to_dict().items():
        table(section, values)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from loom.config import config_from_dict
    from loom.plan.model import count_parameters
    from loom.presets import PRESETS

    print(f"{'preset':<12} {'family':<6} {'layers':>6} {'d_model':>7} {'heads':>5} {'kv':>3} {'params':>10}")
    for name in PRESETS:
        if name == "custom":
            continue
        cfg = config_from_dict({"model": {"preset": name}}).model
        params = count_parameters(cfg, vocab_size=cfg.vocab_size or 257)
        print(
            f"{name:<12} {cfg.family:<6} {cfg.n_layers:>6} {cfg.d_model:>7} {cfg.n_heads:>5} {cfg.kv_heads:>3} "
            f"{params / 1e6:>9.1f}M"
        )
    return 0


def cmd_attention_layout(args: argparse.Namespace) -> int:
    from loom.config import config_from_dict, parse_override
    from loom.sparsity import make_layout
    from loom.viz.attention import causal_density, draw_layout

    params = {"mode": args.kind, "block": args.block, "different_layout_per_head": True}
    for item in args.param:
        _, key, value = parse_override(f"x.{item}")
        params[key] = value
    sparse = config_from_dict({"model": {"attention": "sparse", "sparse_attention": params}}).model.sparse_attention
    layout = make_layout(sparse, args.heads, args.seq_len)
    blocks = layout.shape[-1]
    print(f"{args.kind}: {args.heads} heads, {blocks} x {blocks} blocks of {args.block} tokens")
    for h in range(args.heads):
        print(
            f"  head {h}: {int(layout[h].sum())} blocks kept, {causal_density(layout[h : h + 1]):.2%} of dense causal"
        )
    print(f"density: {causal_density(layout):.2%} of dense causal attention's blocks")
    out = args.out or Path(f"layout_{args.kind}_{args.seq_len}.png")
    title = f"{args.kind}, S = {args.seq_len}, block {args.block}: {causal_density(layout):.1%} of dense causal"
    print(draw_layout(layout, out, title))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    import json

    from loom.viz.schedule import draw_timeline

    simulation_flags = {
        "--schedule": args.schedule,
        "--pp": args.pp,
        "--vp": args.vp,
        "--microbatches": args.microbatches,
        "--forward-cost": args.forward_cost,
        "--backward-cost": args.backward_cost,
        "--weight-cost": args.weight_cost,
        "--transfer-cost": args.transfer_cost,
    }
    if args.from_run is not None:
        from loom.parallel.pipeline.simulate import load_measured

        given = [flag for flag, value in simulation_flags.items() if value is not None]
        if given:
            raise LoomError(
                f"--from-run draws a run's measured timeline; {', '.join(given)} only apply to a simulation.",
                "drop them to draw the run, or drop --from-run to simulate.",
            )
        timeline = load_measured(args.from_run)
        numbers = {"source": "measured", "run_dir": str(args.from_run), **timeline.summary()}
        title = (
            f"measured: {args.from_run.resolve().name} (pp={timeline.pp}, vp={timeline.vp}, "
            f"{timeline.microbatches} micro-batches)"
        )
        out = args.out or args.from_run / Path(TIMELINE_FILE).with_suffix(".png")
        line = f"measured {args.from_run}"
    else:
        from loom.parallel.pipeline.schedules import build_schedule
        from loom.parallel.pipeline.simulate import Costs, bubble_formula, simulate

        name, pp, vp, m = _or(args.schedule, "1f1b"), _or(args.pp, 4), _or(args.vp, 1), _or(args.microbatches, 8)
        costs = Costs(
            forward=_or(args.forward_cost, 1.0),
            backward=_or(args.backward_cost, 2.0),
            weight=args.weight_cost,
            transfer=_or(args.transfer_cost, 0.0),
        )
        timeline = simulate(build_schedule(name, pp, m, vp), costs)
        formula = bubble_formula(name, pp, m, vp, costs)
        numbers = {
            "schedule": name,
            "pp": pp,
            "vp": vp,
            "microbatches": m,
            "makespan": timeline.makespan,
            "bubble_fraction": timeline.bubble_fraction,
            "bubble_formula": formula[0] if formula else None,
            "bubble_theory": formula[1] if formula else None,
            "peak_inflight": timeline.peak_inflight,
            "busy": timeline.busy,
            "idle": timeline.idle,
            "costs": {
                "forward": costs.forward,
                "backward": costs.backward,
                "weight": costs.weight_grad,
                "transfer": costs.transfer,
            },
        }
        title = f"{name}: pp={pp}" + (f", vp={vp}" if vp > 1 else "") + f", {m} micro-batches"
        out = args.out or Path(f"schedule_{name}_pp{pp}_vp{vp}_m{m}.png")
        line = f"{name} pp={pp} vp={vp} microbatches={m}"
        if formula:
            line += f" (theory {formula[0]} = {formula[1]:.1%})"
    if args.json:
        if args.out is not None:
            numbers["chart"] = str(draw_timeline(timeline, args.out, title))
        print(json.dumps(numbers, indent=2))
        return 0
    path = draw_timeline(timeline, out, title)
    print(
        f"{line}: makespan {timeline.makespan:.4g}, bubble {timeline.bubble_fraction:.1%}, "
        f"peak in-flight per rank {timeline.peak_inflight}\nchart: {path}"
    )
    return 0


def _or(value, default):
    return default if value is None else value


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _console():
    from loom.train.metrics import make_console

    return make_console()


def cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from loom.config import load_config
    from loom.plan import report
    from loom.plan.hardware import load_hardware
    from loom.plan.layout import plan

    hardware = load_hardware(args.gpu, args.hardware_file)
    if args.calibrate:
        return _plan_calibrate(args.calibrate, args, hardware)
    if args.run:
        return _plan_run(args.run, args, hardware)
    seq = args.seq_len
    items = [f'model.preset="{args.model}"', f'train.precision="{args.precision}"', *args.overrides]
    config = load_config(None, [*items, "train.seq_len=1"])
    seq = seq or config.model.max_seq_len
    if seq > config.model.max_seq_len:
        items.append(f"model.max_seq_len={seq}")
    config = load_config(None, [*items, f"train.seq_len={seq}"])
    if config.model.vocab_size is None:
        config.model.vocab_size = 257  # the byte tokenizer's
    if args.gpus < 1:
        raise LoomError(f"--gpus {args.gpus} is not a number of devices.", "give --gpus 1 or more.")
    global_batch = args.global_batch or 8 * args.gpus
    predictions = plan(config, args.gpus, global_batch, hardware, "cpu" if hardware.name.startswith("cpu") else "cuda")
    if not predictions:
        raise LoomError(
            f"no layout of {args.gpus} devices is valid for {args.model} with global batch {global_batch}.",
            "choose a device count and global batch that the model's heads, layers and batch divide "
            "(e.g. a power of two), or another --global-batch.",
        )
    fitting = [p for p in predictions if p.fits]
    if args.json:
        print(
            json.dumps(
                {
                    "hardware": dataclasses.asdict(hardware),
                    "layouts": [p.as_dict() for p in fitting[: args.top]],
                    "fits": bool(fitting),
                },
                indent=2,
            )
        )
        return 0 if fitting else 1
    if not fitting:
        print(report.format_nowhere(predictions, hardware, args.gpus))
        return 1
    print(report.format_ranking(predictions, args.top, hardware, args.gpus))
    if args.explain:
        if not 1 <= args.explain <= len(fitting):
            raise LoomError(f"--explain {args.explain} is not in the ranking.", f"give 1 to {len(fitting)}.")
        print()
        print(report.format_explain(fitting[args.explain - 1], hardware))
    return 0


def _read_run(run_dir: Path) -> tuple:
    """A finished run's config, ``summary.json`` and measured medians."""
    import json

    from loom.config import config_from_dict
    from loom.plan import report
    from loom.train.metrics import read_metrics

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise LoomError(f"{summary_path} does not exist.", "give the folder of a finished run (loom train --run-dir).")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    config = config_from_dict(summary["config"])
    layout = report.run_layout(config, summary.get("world_size", 1))
    tokens = config.batch(dp=layout.dp).global_batch * config.train.seq_len
    freeze = config.optim.freeze(config.train.steps) if config.optim.name == "onebit_adam" else None
    measured = report.measured(read_metrics(run_dir), tokens, freeze)
    measured["passes"] = report.measured_passes(run_dir)  # a zero-bubble run's F, I and W seconds
    return config, summary, measured


def _predict_read_run(run: tuple, hardware):
    """(the device the run's processes had, its prediction there): a CPU run's host is the one its
    processes shared (runs from before these summary keys: all of them on it)."""
    from loom.plan import report
    from loom.plan.hardware import on_this_host

    config, summary, _ = run
    device = summary.get("device", "cpu")
    if device == "cpu":
        local = summary.get("local_processes", summary.get("world_size", 1))
        hardware = on_this_host(hardware, local, summary.get("threads"))
    return hardware, report.predict_run(config, summary.get("world_size", 1), hardware, device)


def _load_run(run_dir: Path, args: argparse.Namespace, hardware):
    """A finished run's config, its device (the CPU entry for a CPU run unless another device was
    named), its prediction there and its measured medians."""
    from loom.plan.hardware import load_hardware

    run = _read_run(run_dir)
    if args.gpu == "h100-sxm" and run[1].get("device", "cpu") == "cpu":
        hardware = load_hardware("cpu", args.hardware_file)
    host, prediction = _predict_read_run(run, hardware)
    return run[0], host, prediction, run[2]


def _plan_run(run_dir: Path, args: argparse.Namespace, hardware) -> int:
    import json

    from loom.plan import report

    _, _, prediction, measured = _load_run(run_dir, args, hardware)
    compared = report.side_by_side(prediction, measured)
    print(json.dumps(compared, indent=2) if args.json else report.format_comparison(compared))
    return 0


def _plan_calibrate(run_dirs: list[Path], args: argparse.Namespace, hardware) -> int:
    """Fit this machine's rates (``loom.plan.report``), each on the runs that show it: the compute
    rate on the run without tp/pp traffic or recomputation whose processes have the fewest
    threads (with the blocks' fixed cost per micro-batch where a second such run of as many threads
    runs its FLOPs in other micro-batches), a CPU host's thread efficiency on such a run with more, recomputation's rewrite
    bandwidth on runs that recompute, the link bandwidth on runs with tp or pp traffic (a core per
    process where there are such), the turn latency on the other runs with traffic and more processes than cores,
    the weight pass's speed-up on runs that split their backward (zero-bubble)."""
    import dataclasses
    import statistics

    from loom.plan import report
    from loom.plan.hardware import load_hardware

    runs = [_read_run(run_dir) for run_dir in run_dirs]
    if args.gpu == "h100-sxm" and runs[0][1].get("device", "cpu") == "cpu":
        hardware = load_hardware("cpu", args.hardware_file)
    name = hardware.name if hardware.name.endswith("-calibrated") else f"{hardware.name}-calibrated"
    fitted = dataclasses.replace(hardware, name=name)

    def traffic(p) -> bool:
        return bool(p.comm_bytes["tp"] or p.comm_bytes["pp"])

    def crowded(host) -> bool:
        """More processes than cores on the run's host: its transfers wait turns (``Hardware.turn_wait``)."""
        return bool(host.cores) and host.devices_per_node > host.cores

    def threads(host, p) -> int:
        return host.threads(min(p.layout.dp * p.layout.tp * p.layout.pp, host.devices_per_node))

    def fit(runs_, how, field, rate: bool = True):
        """``fitted`` with ``field`` the median of ``how`` over ``runs_`` (unchanged if none). A
        ``rate`` of 0 means free, the fastest: rates take their median as seconds per unit."""
        values = []
        for run in runs_:
            host, p = _predict_read_run(run, fitted)
            value = getattr(how(run, host, p), field)
            values.append((1 / value if value else 0.0) if rate else value)
        if not values:
            return fitted
        middle = statistics.median(values)
        return dataclasses.replace(fitted, **{field: (1 / middle if middle else 0.0) if rate else middle})

    predicted = [(run, *_predict_read_run(run, fitted)) for run in runs]
    quiet = [  # a crowded run's dp transfers wait turns: the fewest threads among the uncrowded first
        (crowded(host), threads(host, p), i, run)
        for i, (run, host, p) in enumerate(predicted)
        if not traffic(p) and p.layout.recompute == "none"
    ]
    if not quiet:
        raise LoomError(
            "every run given to --calibrate has tp or pp traffic or recomputes, so the compute rate cannot be "
            "told apart from the links or the recomputation.",
            "add a run without tensor or pipeline parallelism and without recomputation (one process, or dp only).",
        )
    quiet.sort(key=lambda q: q[:3])
    fewest = quiet[0][1]
    fitted = fit([quiet[0][3]], lambda run, host, p: report.calibrate(p, run[2], host), "compute_efficiency")
    # a second run of as many threads running its FLOPs in other micro-batches: the blocks' fixed cost
    first = quiet[0][3]
    host, p_first = _predict_read_run(first, fitted)
    paired = None
    for busy, n, _, run in quiet[1:]:
        p = _predict_read_run(run, fitted)[1]
        per_flop = p.overhead_units / p.compute_s / (p_first.overhead_units / p_first.compute_s)
        if n == fewest and not busy and abs(per_flop - 1) > 0.2:
            both = report.calibrate_overhead((p_first, first[2]), (p, run[2]), host)
            fitted = dataclasses.replace(
                fitted, compute_efficiency=both.compute_efficiency, layer_overhead_s=both.layer_overhead_s
            )
            paired = run
            break
    more = [(n, run) for busy, n, _, run in quiet if n > fewest and not busy]
    fitted = fit(
        [run for _, run in more[:1]],
        lambda run, host, p: report.calibrate_threads(p, run[2], host, threads(host, p)),
        "thread_efficiency",
        rate=False,
    )
    recomputing = [run for run, _, p in predicted if not traffic(p) and p.layout.recompute != "none"]
    fitted = fit(recomputing, lambda run, host, p: report.calibrate_rewrite(p, run[2], host), "rewrite_bandwidth")
    linked = [run for run, host, p in predicted if traffic(p) and not crowded(host)]
    linked = linked or [run for run, _, p in predicted if traffic(p)]
    fitted = fit(linked, lambda run, host, p: report.calibrate_links(p, run[2], host), "intra_bandwidth")
    turned = [run for run, host, p in predicted if p.transfers and crowded(host) and id(run) not in map(id, linked)]
    fitted = fit(turned, lambda run, host, p: report.calibrate_turns(p, run[2], host), "turn_latency", rate=False)
    split = [run for run in runs if run[2].get("passes")]
    fitted = fit(
        split, lambda run, host, p: report.calibrate_weight_pass(p, run[2], host), "weight_pass_speedup", rate=False
    )
    out = run_dirs[0] / "hardware.toml"
    out.write_text(report.hardware_toml(fitted), encoding="utf-8")
    precision = runs[quiet[0][2]][0].train.precision
    found = [f"{fitted.compute_efficiency * fitted.peak_flops(precision) / 1e9:.1f} GFLOP/s per device"]
    if paired is not None:
        found.append(f"each block costs {fitted.layer_overhead_s * 1e3:.2f} ms per micro-batch past its FLOPs")
    if more:
        found.append(f"each thread past the first adds {fitted.thread_efficiency:.2f} of one")
    if recomputing:
        rewrites = (
            f"{fitted.rewrite_bandwidth / 1e9:.2f} GB/s" if fitted.rewrite_bandwidth else "no cost past its FLOPs"
        )
        found.append(f"recomputation rewrites at {rewrites} from {len(recomputing)} run(s)")
    if linked:
        found.append(f"links {fitted.intra_bandwidth / 1e9:.2f} GB/s from {len(linked)} run(s)")
    if turned:
        found.append(
            f"a transfer waits {fitted.turn_latency * 1e3:.2f} ms per process queued ahead of a peer on a core, "
            f"from {len(turned)} run(s) with more processes than cores"
        )
    if split:
        found.append(
            f"a split backward's weight pass computes at {fitted.weight_pass_speedup:.2f} x that rate, "
            f"from {len(split)} zero-bubble run(s)"
        )
    print(
        f"{hardware.name}: achieved {fitted.compute_efficiency:.3g} of the {hardware.name} peak ({'; '.join(found)}); "
        f"written to {out}; use --hardware-file {out} --gpu {fitted.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
