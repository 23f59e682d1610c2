"""``loom train``: validate the config and the layout before any process starts, launch the local
ranks (or join torchrun's), train, and on rank 0 plot, summarise and sample."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from loom.errors import LoomError


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
    _build_kernels(config)
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


def _build_kernels(config) -> None:  # noqa: ANN001
    """Before any rank starts: build the C++ sparse kernel once (the ranks then load it from the
    cache instead of each compiling it), and where ``kernel = "cpp"`` asks for it and it cannot be
    built, stop here with the reason (``auto`` falls back in the ranks, with a warning)."""
    sparse = config.model.sparse_attention
    if config.model.attention != "sparse" or sparse.kernel == "torch":
        return
    from loom import native
    from loom.model.block_sparse_cpp import KERNEL

    if sparse.kernel == "cpp":
        native.library(KERNEL)
    else:
        native.available(KERNEL)


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


def _console():
    from loom.train.metrics import make_console

    return make_console()
