"""loom's ZeRO stages 1-3 against PyTorch FSDP2 and DeepSpeed ZeRO 1-3 on the same multi-rank job.

Sides (``common.py`` says how they are timed):

- ``loom ZeRO-1/2/3``: ``Trainer.train_step`` with ``zero.stage`` 1, 2, 3 (stage 3 gathers one
  unit per transformer block plus a root unit with the embeddings and final norm);
- ``FSDP2``: ``fully_shard`` on each block, then on the root, ``reshard_after_forward=True``
  (the same units, gathered for forward, freed, gathered again for backward: 3 Psi per step
  like loom's stage 3), torch's AdamW (``build_adamw``);
- ``DeepSpeed ZeRO-1/2/3``: ``deepspeed.initialize`` with torch's AdamW as the client
  optimizer, on its CPU accelerator (collectives through torch.distributed with gloo), set up
  as its users set up such a job: ``overlap_comm`` on at stages 1-2 (gradient reduction
  overlapping backward, as loom's does), contiguous gradients, reduce and all-gather buckets of
  ``--bucket-mb`` (loom's stage 1-2 bucket); at stage 3 each block is a leaf module (gathered
  whole), nothing persists gathered (``stage3_param_persistence_threshold`` 0,
  ``stage3_max_reuse_distance`` 0: else this small model would stay gathered between forward
  and backward, 2 Psi instead of 3 Psi); ``memory_efficient_linear`` off, because on it
  replaces ``torch.nn.functional.linear`` for the whole process, every side included.
  DeepSpeed is not a loom dependency; install it with torch pinned
  (``DS_BUILD_OPS=0 pip install deepspeed -c PIN``, PIN a file holding ``torch==<installed>``).
  Without it the DeepSpeed sides are left out and the result says why.
- ``loom train ZeRO-1/2/3``: the command, end to end, at each stage.

Every side: the same model and initial weights, batches, lr schedule, AdamW, clipping, fp32.
Goals: loom train ZeRO-3 at least 1.1x FSDP2; loom train at each stage at least 1.0x DeepSpeed's.
Checks (exit 1 if not): loom's per-step dp bytes equal ``loom.plan.memory.dp_bytes_per_step``
(Psi = parameters + padding) plus the loss and the clip norm (one fp32 all-reduce each), its
model-state bytes equal ``model_state_bytes`` + padding, and every side's losses equal loom's
at the same stage to 1e-5.

    python bench/zero.py --out bench/results/zero.md
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist
from common import (
    ALONE,
    LOOM_TRAIN,
    TIMING,
    Result,
    Side,
    TrainerSide,
    add_job_args,
    bench,
    bench_command,
    check_args,
    comparison_table,
    goal_lines,
    job_batches,
    job_config,
    job_items,
    join,
    lr_of,
    noise_line,
    prepare,
    result_head,
    rounds_table,
    run_round,
    sizes,
    tokens_per_step,
    write_result,
)

from loom.distributed.ledger import model_bytes
from loom.model.transformer import Block, Transformer
from loom.optim.adamw import build_adamw
from loom.plan.memory import dp_bytes_per_step, model_state_bytes

STAGES = (1, 2, 3)
FSDP2 = "FSDP2"
AGREE_TOL = 1e-5


def loom_name(stage: int) -> str:
    return f"loom ZeRO-{stage}"


def train_name(stage: int) -> str:
    return f"{LOOM_TRAIN} ZeRO-{stage}"


def ds_name(stage: int) -> str:
    return f"DeepSpeed ZeRO-{stage}"


class Peer(Side):
    """What FSDP2 and DeepSpeed share: the model, lr, batches and the loss a trainer logs."""

    def __init__(self, config, ctx, data) -> None:
        self.config = config
        comm = ctx.comm("dp")
        self.group, self.world, self.dp = comm.group, comm.size, (comm.size, comm.rank)
        self.model = Transformer(config.model, seed=config.train.seed, device=ctx.device)
        self.data, self.device = data, ctx.device

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ((x, y),) = job_batches(self.config, self.data, *self.dp, self.device, steps=[k])[0]
        return x, y

    def logged(self, loss: torch.Tensor) -> float:
        total = loss.detach().float().clone()
        dist.all_reduce(total, group=self.group)
        return total.item() / self.world


class Fsdp2(Peer):
    """FSDP2: fully_shard on each block, then on the root; torch's AdamW on the DTensor shards."""

    name = FSDP2

    def __init__(self, config, ctx, data, mesh) -> None:
        from torch.distributed.fsdp import fully_shard

        super().__init__(config, ctx, data)
        for block in self.model.blocks.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(self.model, mesh=mesh, reshard_after_forward=True)
        self.optimizer = build_adamw(self.model, config.train, ctx.device)

    def step(self, k: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_of(self.config, k)
        loss = self.model.loss(*self.batch(k))
        loss.backward()
        value = self.logged(loss)
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value


class DeepSpeed(Peer):
    """DeepSpeed's ZeRO engine at one stage, torch's AdamW as its client optimizer."""

    def __init__(self, config, ctx, data, stage: int, bucket_mb: float) -> None:
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        super().__init__(config, ctx, data)
        self.name = ds_name(stage)
        train = config.train
        elements = int(bucket_mb * 2**20) // 4
        zero = {
            "stage": stage,
            "reduce_bucket_size": elements,
            "allgather_bucket_size": elements,
            "contiguous_gradients": True,
            "memory_efficient_linear": False,
        }
        if stage in (1, 2):
            zero["overlap_comm"] = True
        else:
            zero.update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0)
            set_z3_leaf_modules(self.model, [Block])  # a block's parameters are gathered together
            # the tied head reads tok_emb.weight in the root's forward, outside tok_emb's own
            deepspeed.zero.register_external_parameter(self.model, self.model.tok_emb.weight)
        ds_config = {
            "train_micro_batch_size_per_gpu": train.micro_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": train.grad_clip,
            "steps_per_print": 2**31,
            "wall_clock_breakdown": False,
        }
        optimizer = build_adamw(self.model, train, ctx.device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )

    def step(self, k: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_of(self.config, k)
        x, y = self.batch(k)
        loss = self.model.loss_from_logits(self.engine(x), y)  # through the engine's forward (its hooks)
        self.engine.backward(loss)
        value = self.logged(loss)
        self.engine.step()  # clip, AdamW, zero grads
        return value


# torch functions DeepSpeed is known to swap process-wide (ZeRO-3's Init and memory-efficient linear)
_GLOBALS = (
    (torch.nn.functional, ("linear", "embedding")),
    (torch, ("zeros", "empty", "tensor")),
    (torch.Tensor, ("__new__",)),
    (torch.nn.Module, ("apply",)),
)


def _torch_globals() -> dict[str, object]:
    return {f"{o.__name__}.{n}": inspect.getattr_static(o, n) for o, names in _GLOBALS for n in names}


def _deepspeed_sides(config, ctx, data, bucket_mb: float) -> tuple[list[Side], str]:
    """The DeepSpeed sides, or none and why (on every rank alike): not installed, failed to
    start, or swapped a torch function that the other sides would then run too."""
    sides, error = [], ""
    try:
        warnings.filterwarnings("ignore", category=FutureWarning)
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
        for stage in STAGES:
            before = _torch_globals()
            sides.append(DeepSpeed(config, ctx, data, stage, bucket_mb))
            swapped = [k for k, v in _torch_globals().items() if v is not before[k]]
            if swapped:
                raise RuntimeError(f"deepspeed.initialize replaced {', '.join(swapped)} for the whole process")
    except Exception as exc:  # noqa: BLE001 - the exact error goes into the result
        sides, error = [], f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    flag = torch.tensor([1.0 if error else 0.0])
    dist.all_reduce(flag)
    if flag.item() and not error:
        error = "failed on another rank"
    return ([] if error else sides), error


def rank_round(items: list[str], root: str, bucket_mb: float, with_ds: bool, round_index: int, alone: bool) -> dict:
    """loom's three stages and the peers interleaved, or (``alone``) the peers one after the other."""
    from torch.distributed.device_mesh import DeviceMesh

    ctx, config, data = join(items)
    sides: list[Side] = []
    for stage in () if alone else STAGES:
        staged = job_config([*items, f"zero.stage={stage}"])
        sides.append(TrainerSide(loom_name(stage), staged, ctx, Path(root) / f"zero{stage}-{round_index}"))
    sides.append(Fsdp2(config, ctx, data, DeviceMesh.from_group(ctx.comm("dp").group, ctx.device.type)))
    error = "not asked for (--no-deepspeed)"
    if with_ds:
        ds, error = _deepspeed_sides(config, ctx, data, bucket_mb)
        sides += ds
    memory = {s.name: s.trainer.update.zero.memory() for s in sides if isinstance(s, TrainerSide)}
    runs = run_round(sides, config.train.steps, round_index, alone)
    for name, mem in memory.items():
        runs[name].facts["memory"] = mem
    runs[FSDP2].facts["deepspeed"] = error
    return runs


def check_stage(r: Result, stage: int, world: int, psi: int) -> tuple[bool, str]:
    """loom's dp bytes and model-state bytes at ``stage`` against the formulas."""
    name = loom_name(stage)
    mem = r.facts[name][0]["memory"]
    padded = psi + mem["padding_elements"]
    scalars = 2 * model_bytes("all_reduce", world, 4)  # the logged loss and the clip norm's square
    want = Fraction(dp_bytes_per_step(stage, padded, world, param_bytes=4, grad_bytes=4)) + Fraction(scalars)
    sent = {Fraction(b["comm_bytes_dp"]) for b in r.bytes[name]}
    state = mem["mem_params_bytes"] + mem["mem_grads_bytes"] + mem["mem_optim_bytes"]
    formula = model_state_bytes(stage, psi, world, param_bytes=4, grad_bytes=4, k=8)["total"]
    ok = sent == {want} and state == formula + mem["padding_bytes"]
    return ok, (
        f"{name}: dp bytes per step per rank {', '.join(f'{float(b):,.0f}' for b in sorted(sent))} against "
        f"{float(want):,.0f} (formula for Psi + padding = {padded:,}, plus the loss and the norm); model states "
        f"{state:,} B per rank against {formula:,} + padding {mem['padding_bytes']:,}: "
        f"{'equal' if ok else 'DIFFERENT'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_args(p, d_model=256, steps=20, repeats=4)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="loom ddp.bucket_mb = DeepSpeed's bucket sizes")
    p.add_argument("--worlds", default="2,4", help="comma-separated rank counts")
    p.add_argument("--no-deepspeed", action="store_true", help="leave the DeepSpeed sides out")
    args = p.parse_args(argv)
    check_args(p, args)
    worlds = sizes(p, "--worlds", args.worlds, "world size")
    items = job_items(
        args, f"train.micro_batch={args.micro_batch}", "train.grad_accum=1", f"ddp.bucket_mb={args.bucket_mb}"
    )
    config = prepare(items)
    psi = Transformer(config.model, seed=config.train.seed, device="meta").num_params()
    load = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="loom-bench-zero-") as root:
        for world in worlds:
            e2e = {train_name(s): [*items, f"zero.stage={s}"] for s in STAGES}
            rank_args = (items, root, args.bucket_mb, not args.no_deepspeed)
            results.append(
                bench(f"{world} ranks", world, tokens_per_step(config, world), rank_round, rank_args, args, e2e)
            )

    errors = {f.get("deepspeed", "") for r in results for f in r.facts[FSDP2]}
    ds_note = (
        f"DeepSpeed {_deepspeed_version()}, configured as above."
        if errors == {""}
        else f"DeepSpeed sides left out: {'; '.join(sorted(e for e in errors if e))}."
    )
    job = (
        f"{config.model.preset} ({config.model.family}, {config.model.n_layers} layers, d_model "
        f"{config.model.d_model}, {psi / 1e6:.2f}M parameters), {args.micro_batch} x {args.seq_len} tokens per rank "
        f"per step, bucket {args.bucket_mb:g} MiB, {args.steps} steps ({args.steps - args.warmup} timed) x "
        f"{args.repeats} rounds, fp32, gloo, 1 thread per rank. {ds_note}"
    )
    ok, checks = True, []
    for r, world in zip(results, worlds, strict=True):
        for stage in STAGES:
            good, line = check_stage(r, stage, world, psi)
            peers = [n for n in (ds_name(stage), *([FSDP2] if stage == 3 else [])) if n in r.tps]
            diffs = {n: r.loss_diff(loom_name(stage), n) for n in peers}
            good &= all(d < AGREE_TOL for d in diffs.values())
            agree = "; ".join(f"losses vs {n} differ by at most {d:.1e}" for n, d in diffs.items())
            checks.append(f"- {r.label}, {line}" + (f"; {agree}" if agree else "") + ".")
            ok &= good
    e2e = not args.no_e2e
    peers = [(FSDP2, loom_name(3), train_name(3), 1.1)]
    peers += [(ds_name(s), loom_name(s), train_name(s), 1.0) for s in STAGES if ds_name(s) in results[0].tps]
    tables, pairs = [], []
    for peer, loom, train, goal in peers:
        alone = f"{peer} {ALONE}"
        mine = [(loom, peer), *([(train, alone)] if e2e else [])]
        tables.append(comparison_table(results, "ranks", [peer, loom, *([alone, train] if e2e else [])], mine))
        pairs += [(a, b, goal) for a, b in reversed(mine)]
    goals = goal_lines(results, pairs)
    noise = noise_line(load)
    flat = [line for table in tables for line in (*table, "")]
    print("\n".join([*flat, *goals, "", *checks, "", noise]))
    everyone = [n for n in results[0].tps]

    def render(when: str) -> str:
        lines = result_head("ZeRO: loom vs FSDP2 and DeepSpeed", bench_command("zero.py"), when, job)
        lines += [*flat, "Goals:", "", *goals, "", "Checks:", "", *checks, "", "Per round:", ""]
        lines += [*rounds_table(results, everyone), "", f"Timing: {TIMING}", "", noise, ""]
        return "\n".join(lines)

    write_result(args.out, render)
    return 0 if ok else 1


def _deepspeed_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except Exception:  # noqa: BLE001
        return "(not importable)"


if __name__ == "__main__":
    sys.exit(main())
