"""loom's ZeRO stages 1-3 against PyTorch FSDP2 and DeepSpeed ZeRO 1-3 on the same multi-rank job.

Sides. ``loom1``/``loom2``/``loom3``: :class:`~loom.parallel.zero.ZeroOptimizer` at stage 1,
2, 3 on the plain ``Transformer`` (stage 3 gathers one unit per transformer block plus a
root unit holding the embeddings and final norm). ``fsdp2``: torch's ``fully_shard``
applied to each block, then to the root, ``reshard_after_forward=True`` (the same units,
gathered for forward, freed, gathered again for backward: 3Psi per step like loom's stage
3), with torch's AdamW. ``ds1``/``ds2``/``ds3``: DeepSpeed's ZeRO 1/2/3 engine
(``deepspeed.initialize`` with torch's AdamW as the client optimizer) on its CPU
accelerator, whose collectives fall back to torch.distributed with gloo when Intel's
oneCCL bindings are absent. Its ZeRO-3 is set to match the others' units: each block is
a "z3 leaf module" (gathered whole), no parameter persists unsharded
(``stage3_param_persistence_threshold`` 0) and none is kept gathered from forward to
backward (``stage3_max_reuse_distance`` 0, which with its default of 1e9 would keep this
whole model gathered between forward and backward, 2Psi per step instead of 3Psi); its
gradient reduce and all-gather buckets are ``--bucket-mb`` as loom's stage 1/2 buckets. Its
``memory_efficient_linear`` is off: on, the ZeRO-3 engine replaces ``torch.nn.functional.linear``
for the whole process, so every side sharing the process would run DeepSpeed's linear (the
script checks that no DeepSpeed engine swapped a torch function, and drops DeepSpeed if one did).

DeepSpeed is not a loom dependency. To include it (torch pinned so pip does not replace it)::

    echo "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')" > /tmp/torch-pin.txt
    DS_BUILD_OPS=0 pip install deepspeed -c /tmp/torch-pin.txt

Without it (or if its engine fails to start) the ``ds`` sides are left out and the result
says why, with the exact error.

Every side trains the same model (one config and seed on every rank, so the weights start
identical), on the same global batch (rank r taking rows ``batch_rows(micro, 1, r, 0)`` of
the step's ``batch_offsets``), with the same AdamW hyperparameters (lr schedule ``lr_at``,
betas, eps, weight decay on matrices only) and the same gradient clipping, in fp32 by
default (``--precision bf16``: 16-bit parameters and gradients, fp32 master weights and
moments, on every side: loom ``param_dtype="bf16"``, FSDP2 ``MixedPrecisionPolicy`` with
bf16 parameters and reductions, DeepSpeed ``bf16.enabled``). A step is: lr, forward +
loss, backward (with the gradient reductions), the loss all-reduce and ``.item()`` a
trainer does for its metrics, then clip + AdamW + zero grads.

Timing. As in ``bench/ddp.py``: ranks start once per world size (``run_ranks``, gloo, one
thread per rank); each round builds every side afresh and runs step k of every side back
to back, the order rotating step by step and round by round, so load from elsewhere hits
all alike. A side's tokens/s is the global tokens per step over the median of rank 0's
whole-step wall time after ``--warmup`` steps, median over rounds; ratio = loom's tokens/s
/ the peer's; paired ratio = median over timed steps of the peer's step time / loom's at
the same step. CPU ms/step is rank 0's process CPU time per step (all threads, gloo's too).

State bytes per rank, taken after the backward of one extra untimed step at the end of a
round (gradients reduced, optimizer states allocated): loom from ``zero.memory()``; FSDP2
from the local shards of its parameters and gradients (DTensors) and the optimizer's
state; DeepSpeed from the distinct tensor storages reachable from the parameters (their
``ds_tensor`` partitions at stage 3), their gradients and its ZeRO optimizer object
(fp32 partitions and the inner optimizer's moments counted as optimizer states, the
gradient partitions, averaging and bucket buffers as gradients).

Bytes on the wire: loom's ledger gives the dp bytes each rank sends per step in ZeRO's own
collectives (tags "zero-grad", "zero-param"; not the clip norm or the loss scalar),
checked against ``loom.plan.memory.dp_bytes_per_step`` for Psi = parameters + padding, and
its state bytes against ``model_state_bytes`` + padding. The script exits non-zero if the
bytes differ from the formula or (fp32) a side's losses differ from loom's by 1e-5 or more.

    python bench/zero.py --out bench/results/zero.md             # 2 and 4 ranks, 3 rounds, ~6 min on 2 cores
    python bench/zero.py --steps 6 --warmup 2 --repeats 1 --worlds 2   # a quick end-to-end check
    python bench/zero.py --sides loom3,fsdp2 --worlds 2          # a subset of the sides
"""

from __future__ import annotations

import argparse
import gc
import inspect
import logging
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from common import (
    ONE_ROUND,
    StepRecord,
    add_model_args,
    bench_command,
    busy_warning,
    check_rounds,
    checkout,
    closing_lines,
    fmt_bytes,
    fmt_ranks,
    head_lines,
    job_config,
    job_overrides,
    machine,
    noise_head,
    paired_ratio,
    sizes,
    write_result,
)

from loom.config import Config
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.errors import LoomError
from loom.model.transformer import Block, Transformer
from loom.optim.adamw import build_adamw
from loom.optim.lr import lr_at
from loom.parallel.zero.optimizer import ZeroOptimizer
from loom.plan.memory import dp_bytes_per_step, model_state_bytes
from loom.train.batches import batch_offsets, batch_rows, get_batch
from loom.train.data import prepare_dataset
from loom.train.trainer import TRAIN_STREAM

SIDES = ("loom1", "loom2", "loom3", "fsdp2", "ds1", "ds2", "ds3")
PAIRS = (("loom3", "fsdp2", 1.1), ("loom1", "ds1", 1.0), ("loom2", "ds2", 1.0), ("loom3", "ds3", 1.0))
LABEL = {
    "loom1": "loom ZeRO-1",
    "loom2": "loom ZeRO-2",
    "loom3": "loom ZeRO-3",
    "fsdp2": "FSDP2 (fully_shard)",
    "ds1": "DeepSpeed ZeRO-1",
    "ds2": "DeepSpeed ZeRO-2",
    "ds3": "DeepSpeed ZeRO-3",
}
AGREE_TOL = 1e-5  # fp32: max |loss - loom's loss| over all steps for "agree" (bf16 runs: shown, not checked)
NOISY_SPREAD = 0.05  # per-round ratios further apart than this: the machine was busy
PHASES = ("fwd", "bwd", "sync", "loss", "opt")  # sync: loom's finish_gradient_sync (peers: inside bwd)
STATE = ("params", "grads", "optim")
ZERO_TAGS = ("zero-grad", "zero-param")


@dataclass
class Run(StepRecord):
    """One side's per-step record for one round, as one rank saw it (and what only this bench keeps)."""

    phases: ClassVar[tuple[str, ...]] = PHASES
    dp_bytes: list[int | float] = field(default_factory=list)  # loom only: ledger, ZeRO's collectives
    state: dict[str, int] = field(default_factory=dict)  # bytes per category, from the probe step


# ----------------------------------------------------------------------------- state bytes


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard


class Storages:
    """Distinct tensor storages, each counted once under the first category that reaches it."""

    def __init__(self) -> None:
        self.bytes = dict.fromkeys(STATE, 0)
        self._seen: set[int] = set()

    def add(self, t: torch.Tensor | None, category: str) -> None:
        if t is None or t.device.type == "meta":
            return
        storage = _local(t).untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes[category] += storage.nbytes()

    def walk(self, obj, path: str, classify, depth: int = 0, visited: set[int] | None = None) -> None:
        """Every tensor reachable from ``obj`` through containers and DeepSpeed/torch.optim objects."""
        visited = set() if visited is None else visited
        if depth > 6 or id(obj) in visited:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.add(obj, classify(path))
            if obj.grad is not None:
                self.add(obj.grad, "grads")
            return
        if isinstance(obj, dict):
            items = [(f"{path}[{k if isinstance(k, (str, int)) else ''}]", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set)):
            items = [(f"{path}[]", v) for v in obj]
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
            items = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
        else:
            return
        for sub, value in items:
            self.walk(value, sub, classify, depth + 1, visited)


def _ds_category(path: str) -> str:
    """A tensor under DeepSpeed's ZeRO optimizer (``opt.<attribute>...``): its fp32 partitions and the inner
    optimizer's state are optimizer states; the rest (gradient partitions, averaging and bucket buffers,
    norms) counts as gradients."""
    attribute = path.split(".")[1].split("[")[0]
    if "grad" not in attribute and ("fp32" in attribute or "single_partition" in attribute or attribute == "optimizer"):
        return "optim"
    return "grads"


# ----------------------------------------------------------------------------- one rank


class Side:
    """One implementation's model, optimizer and step; ``step`` records into ``run``."""

    name = ""

    def __init__(self, config: Config, ctx) -> None:
        self.config = config
        self.model = Transformer(config.model, seed=config.train.seed, device=ctx.device)
        self.run = Run()

    def lr(self, step: int) -> float:
        train = self.config.train
        return lr_at(step, train.lr, train.warmup_steps, train.steps, train.min_lr_ratio)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor, probe: bool = False) -> None:
        """One training step; with ``probe``, take the state bytes after backward and record no time."""
        raise NotImplementedError


class LoomSide(Side):
    """loom's ZeroOptimizer at one stage, on the plain Transformer."""

    def __init__(self, config: Config, ctx, stage: int, bucket_mb: float, precision: str) -> None:
        super().__init__(config, ctx)
        train = config.train
        self.name = f"loom{stage}"
        self.ledger, self.comm = ctx.ledger, ctx.comm("dp")
        self.zero = ZeroOptimizer(
            self.model,
            self.comm,
            stage,
            train.lr,
            betas=(train.beta1, train.beta2),
            eps=train.eps,
            weight_decay=train.weight_decay,
            param_dtype=precision,
            bucket_mb=bucket_mb,
        )

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor, probe: bool = False) -> None:
        mark = max((e.seq for e in self.ledger.recent(1)), default=0)
        c0, t0 = time.process_time(), time.perf_counter()
        lr = self.lr(step)
        loss = self.model.loss(x, y)
        t1 = time.perf_counter()
        self.zero.scale_loss(loss).backward()
        t2 = time.perf_counter()
        self.zero.finish_gradient_sync()
        t3 = time.perf_counter()
        if probe:
            memory = self.zero.memory()
            self.run.state = {k: memory[f"mem_{k}_bytes"] for k in STATE}
            self.run.state |= {
                "padding": memory["padding_bytes"],
                "padding_elements": memory["padding_elements"],
                "k": memory["optim_bytes_per_element"],
            }
        total = loss.detach().float().clone()
        self.comm.all_reduce(total, op="avg", tag="metrics")
        value = total.item()
        t4 = time.perf_counter()
        if self.config.train.grad_clip > 0:
            self.zero.clip_grad_norm(self.config.train.grad_clip)
        self.zero.step(lr)
        self.zero.zero_grad()
        t5 = time.perf_counter()
        cpu = time.process_time() - c0
        if probe:
            return
        calls = 4 * len(self.zero.groups) + 8  # at most 3 per group (stage 3), the clip norm and loss scalars
        sent = [e for e in self.ledger.recent(calls) if e.seq > mark and e.tag in ZERO_TAGS]
        self.run.dp_bytes.append(sum(e.bytes_sent for e in sent))
        self.run.losses.append(value)
        self.run.record(cpu, t0, t1, t2, t3, t4, t5)


class FsdpSide(Side):
    """FSDP2: fully_shard on each block, then on the root; torch's AdamW on the DTensor shards."""

    name = "fsdp2"

    def __init__(self, config: Config, ctx, mesh, precision: str) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        super().__init__(config, ctx)
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
            if precision == "bf16"
            else MixedPrecisionPolicy()
        )
        for block in self.model.blocks.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
        fully_shard(self.model, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
        self.group, self.world = ctx.comm("dp").group, ctx.comm("dp").size
        self.optimizer = build_adamw(self.model, config.train, ctx.device)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor, probe: bool = False) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step)
        loss = self.model.loss(x, y)
        t1 = time.perf_counter()
        loss.backward()  # the reduce-scatters and their final wait run in here
        t2 = t3 = time.perf_counter()
        if probe:
            held = Storages()
            for p in self.model.parameters():
                held.add(p, "params")
            for p in self.model.parameters():
                held.add(p.grad, "grads")
            held.walk(self.optimizer.state, "opt.optimizer.state", lambda _: "optim")
            self.run.state = held.bytes
        total = loss.detach().float().clone()
        dist.all_reduce(total, group=self.group)
        value = total.item() / self.world
        t4 = time.perf_counter()
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        cpu = time.process_time() - c0
        if not probe:
            self.run.losses.append(value)
            self.run.record(cpu, t0, t1, t2, t3, t4, t5)


class DeepSpeedSide(Side):
    """DeepSpeed's ZeRO engine at one stage, torch's AdamW as its client optimizer."""

    def __init__(self, config: Config, ctx, stage: int, bucket_mb: float, precision: str) -> None:
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        super().__init__(config, ctx)
        train = config.train
        self.name = f"ds{stage}"
        self.group, self.world = ctx.comm("dp").group, ctx.comm("dp").size
        elements = int(bucket_mb * 2**20) // (2 if precision == "bf16" else 4)
        # memory_efficient_linear (on by default) makes the ZeRO-3 engine replace torch.nn.functional.linear
        # process-wide with its own autograd function, which every other side here would then run too
        zero = {
            "stage": stage,
            "reduce_bucket_size": elements,
            "allgather_bucket_size": elements,
            "memory_efficient_linear": False,
        }
        if stage == 3:
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
            "bf16": {"enabled": precision == "bf16"},
        }
        optimizer = build_adamw(self.model, train, ctx.device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor, probe: bool = False) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step)
        loss = self.model.loss_from_logits(self.engine(x), y)  # through the engine's forward (its hooks)
        t1 = time.perf_counter()
        self.engine.backward(loss)
        t2 = t3 = time.perf_counter()
        if probe:
            held = Storages()
            params = list(self.model.parameters())
            for p in params:
                held.add(p, "params")
                held.add(getattr(p, "ds_tensor", None), "params")
            for p in params:
                held.add(p.grad, "grads")
            held.walk(self.optimizer, "opt", _ds_category)
            self.run.state = held.bytes
        total = loss.detach().float().clone()
        dist.all_reduce(total, group=self.group)
        value = total.item() / self.world
        t4 = time.perf_counter()
        self.engine.step()  # clip, AdamW, zero grads
        t5 = time.perf_counter()
        cpu = time.process_time() - c0
        if not probe:
            self.run.losses.append(value)
            self.run.record(cpu, t0, t1, t2, t3, t4, t5)


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every engine it builds; the torch collectives it calls warn of deprecation."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")
    try:
        from deepspeed.utils import logger
    except Exception:  # noqa: BLE001 - not installed or broken: reported when a side is built
        return
    logger.setLevel(logging.ERROR)


_GLOBALS = (
    (torch.nn.functional, ("linear", "embedding")),
    (torch, ("zeros", "empty", "tensor")),
    (torch.Tensor, ("__new__",)),
    (torch.nn.Module, ("apply",)),
)


def _torch_globals() -> dict[str, object]:
    """torch functions DeepSpeed is known to swap process-wide (ZeRO-3's Init and memory-efficient linear)."""
    return {
        f"{owner.__name__}.{name}": inspect.getattr_static(owner, name) for owner, names in _GLOBALS for name in names
    }


def _restore_torch_globals(saved: dict[str, object]) -> None:
    for owner, names in _GLOBALS:
        for name in names:
            if inspect.getattr_static(owner, name) is not saved[f"{owner.__name__}.{name}"]:
                setattr(owner, name, saved[f"{owner.__name__}.{name}"])


def _make_sides(names: list[str], config: Config, ctx, mesh, args: dict, ds_error: list[str]) -> list[Side]:
    """Build the sides in ``names``; the ds sides only while DeepSpeed worked on every rank."""
    sides: list[Side] = []
    for name in names:
        if name.startswith("loom"):
            sides.append(LoomSide(config, ctx, int(name[-1]), args["bucket_mb"], args["precision"]))
        elif name == "fsdp2":
            sides.append(FsdpSide(config, ctx, mesh, args["precision"]))
        elif not ds_error:
            before = _torch_globals()
            try:
                side, failed = DeepSpeedSide(config, ctx, int(name[-1]), args["bucket_mb"], args["precision"]), ""
                patched = [k for k, v in _torch_globals().items() if v is not before[k]]
                if patched:
                    raise RuntimeError(f"deepspeed.initialize replaced {', '.join(patched)} for the whole process")
            except Exception as exc:  # noqa: BLE001 - the exact error goes into the result
                side, failed = None, f"{type(exc).__name__}: {exc}".strip()
                _restore_torch_globals(before)
            flag = torch.tensor([1.0 if failed else 0.0])
            dist.all_reduce(flag)  # all ranks drop DeepSpeed together, or none
            if flag.item() or failed:
                ds_error.append(failed or "failed on another rank")
            else:
                sides.append(side)
    return sides


def rank_main(overrides: list[str], names: list[str], repeats: int, args: dict) -> dict:
    """Per rank: its rows of each step's global batch; per round fresh sides, their steps interleaved."""
    if any(name.startswith("ds") for name in names):
        _quiet_deepspeed()
    config, tokenizer = job_config(overrides)
    ctx = init_distributed(config.parallel)
    data = prepare_dataset(config.data, tokenizer)  # the parent tokenised it: a cache hit
    train, dp, rank = config.train, ctx.dims.dp, ctx.coords.dp
    batches = []
    for step in range(train.steps):
        offsets = batch_offsets(len(data.train), train.seq_len, train.micro_batch * dp, train.seed, step, TRAIN_STREAM)
        rows = offsets[batch_rows(train.micro_batch, 1, rank, 0)]
        batches.append(get_batch(data.train, train.seq_len, rows, ctx.device))
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(ctx.comm("dp").group, ctx.device.type) if "fsdp2" in names else None
    world = ctx.comm("world")
    rounds, ds_error = [], []
    for r in range(repeats):
        sides = _make_sides(names, config, ctx, mesh, args, ds_error)
        gc.collect()
        world.barrier()
        for step, (x, y) in enumerate(batches):
            shift = (r + step) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                side.step(step, x, y)
        for side in sides:  # untimed: the state bytes after a backward
            side.step(train.steps - 1, *batches[-1], probe=True)
        world.barrier()
        rounds.append({side.name: side.run for side in sides})
        del sides
    params = Transformer(config.model, seed=train.seed).num_params()
    out = {
        "params": params,
        "ds_error": ds_error[0] if ds_error else "",
        "dp_bytes": {
            s: sorted({b for rd in rounds for b in rd[s].dp_bytes}) for s in rounds[0] if s.startswith("loom")
        },
        "state": {s: rounds[-1][s].state for s in rounds[0]},
    }
    if ctx.is_main:
        out["rounds"] = rounds
    return out


# ----------------------------------------------------------------------------- report


def source() -> str:
    """Which loom was measured: the checkout's commit and its uncommitted changes under src/ (read-only git)."""
    commit, changed, where = checkout()
    zero_code = (
        "src/loom/parallel/zero.py",
        "src/loom/parallel/zero_flat.py",
        "src/loom/optim/adam.py",
        "src/loom/distributed/",
    )
    touched = [c for c in changed if c.startswith(zero_code) or "src/loom/distributed/".startswith(c)]
    if not changed:
        state = "src/ as committed"
    else:
        zero_state = (
            f"uncommitted changes to the ZeRO code: {', '.join(touched)}"
            if touched
            else "the ZeRO code (parallel/zero*.py, optim/adam.py, dist/) as committed"
        )
        others = ", ".join(c for c in changed if c not in touched) or "none"
        state = f"{zero_state}; other uncommitted changes under src/: {others}"
    return f"loom at commit {commit}; {state}{where}"


def peer_version() -> str:
    try:
        from importlib.metadata import version

        return f"DeepSpeed {version('deepspeed')}"
    except Exception:  # noqa: BLE001
        return "DeepSpeed not installed"


@dataclass
class WorldResult:
    """One world size: per-round medians of each side, losses, bytes and state."""

    world: int
    tokens_per_step: int
    sides: list[str]
    step_s: dict[str, list[float]]  # side -> per-round median step seconds
    cpu_s: dict[str, list[float]]
    phases: dict[str, list[dict[str, float]]]
    paired: dict[tuple[str, str], list[float]]  # (loom, peer) -> per-round paired ratio
    loss0: dict[str, float]  # side -> step 0 loss (round 1)
    loss_diff: dict[str, float]  # side -> max |loss - reference loom side's| over steps and rounds
    state: dict[str, dict[str, int]]  # side -> bytes per category (rank 0)
    state_range: dict[str, tuple[int, int]]  # side -> min and max over ranks of the total state bytes
    dp_bytes: dict[str, set]  # loom side -> bytes per step seen on any rank
    formula: dict[str, int | float]  # loom side -> dp_bytes_per_step
    state_formula: dict[str, int | float]  # loom side -> model_state_bytes total + padding
    ds_error: str
    wall_s: float

    def tps(self, side: str) -> list[float]:
        return [self.tokens_per_step / s for s in self.step_s[side]]

    def median_tps(self, side: str) -> float:
        return statistics.median(self.tps(side))

    def pairs(self) -> list[tuple[str, str, float]]:
        return [p for p in PAIRS if p[0] in self.sides and p[1] in self.sides]

    def ratios(self, loom: str, peer: str) -> list[float]:
        return [a / b for a, b in zip(self.tps(loom), self.tps(peer))]

    def ratio(self, loom: str, peer: str) -> float:
        return self.median_tps(loom) / self.median_tps(peer)

    def bytes_match(self, side: str) -> bool:
        return self.dp_bytes[side] == {self.formula[side]}


def reference(side: str) -> str:
    """The loom side a side's losses are compared with (its own stage; loom3 for FSDP2)."""
    return "loom3" if side == "fsdp2" else f"loom{side[-1]}" if side.startswith("ds") else "loom1"


def bench_world(world: int, overrides: list[str], names: list[str], args: argparse.Namespace) -> WorldResult:
    began = time.perf_counter()
    # a generous bound: startup (DeepSpeed builds its engines), then every step at a pessimistic 2 s per rank
    # pair (bf16 matmuls run ~15x slower than fp32 on CPUs without native bf16)
    per_step = 2.0 if args.precision == "fp32" else 30.0
    timeout = 180 + per_step * len(names) * args.repeats * (args.steps + 1) * max(1, world // 2)
    options = {"bucket_mb": args.bucket_mb, "precision": args.precision}
    results = run_ranks(
        rank_main,
        world,
        args=(overrides, names, args.repeats, options),
        timeout_s=timeout,
        env={"DS_ACCELERATOR": "cpu"},
    )
    wall = time.perf_counter() - began
    main = results[0]
    rounds, params = main["rounds"], main["params"]
    sides = [s for s in names if s in rounds[0]]
    tokens = args.micro_batch * world * args.seq_len
    loss_diff = {
        s: max(abs(a - b) for rd in rounds for a, b in zip(rd[s].losses, rd[reference(s)].losses, strict=True))
        for s in sides
        if reference(s) in sides
    }
    n, width = world, 2 if args.precision == "bf16" else 4
    formula, state_formula, dp_bytes = {}, {}, {}
    for s in (s for s in sides if s.startswith("loom")):
        stage, state = int(s[-1]), main["state"][s]
        psi = params + state["padding_elements"]  # the padded elements travel too
        formula[s] = dp_bytes_per_step(stage, psi, n, param_bytes=width, grad_bytes=width)
        state_formula[s] = (
            model_state_bytes(stage, params, n, param_bytes=width, grad_bytes=width, k=state["k"])["total"]
            + state["padding"]
        )
        dp_bytes[s] = {b for r in results for b in r["dp_bytes"][s]}
    totals = {s: [sum(r["state"][s][k] for k in STATE) for r in results] for s in sides}
    state_range = {s: (min(t), max(t)) for s, t in totals.items()}
    return WorldResult(
        world,
        tokens,
        sides,
        {s: [rd[s].median_step_s(args.warmup) for rd in rounds] for s in sides},
        {s: [rd[s].median_cpu_s(args.warmup) for rd in rounds] for s in sides},
        {s: [rd[s].median_phase_ms(args.warmup) for rd in rounds] for s in sides},
        {
            (a, b): [paired_ratio(rd[a], rd[b], args.warmup) for rd in rounds]
            for a, b, _ in PAIRS
            if a in sides and b in sides
        },
        {s: rounds[0][s].losses[0] for s in sides},
        loss_diff,
        {s: main["state"][s] for s in sides},
        state_range,
        dp_bytes,
        formula,
        state_formula,
        main["ds_error"],
        wall,
    )


def pair_lines(results: list[WorldResult]) -> list[str]:
    lines = [
        "| ranks | loom | peer | loom tokens/s | peer tokens/s | ratio (loom / peer) | paired ratio | goal | |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    if not any(r.pairs() for r in results):
        return ["No loom side ran next to its peer (see --sides and the DeepSpeed line)."]
    for r in results:
        for loom, peer, goal in r.pairs():
            ratio = r.ratio(loom, peer)
            lines.append(
                f"| {fmt_ranks(r.world)} | {LABEL[loom]} | {LABEL[peer]} | {r.median_tps(loom):,.0f} | "
                f"{r.median_tps(peer):,.0f} | {ratio:.3f} | {statistics.median(r.paired[loom, peer]):.3f} | "
                f"{goal:.1f} | {'meets' if ratio >= goal else 'misses'} |"
            )
    return lines


def side_lines(results: list[WorldResult], checked: bool) -> list[str]:
    phases = "/".join(PHASES)
    lines = [
        f"| ranks | side | tokens/s | CPU ms/step | ms {phases} | state bytes/rank: params | grads | optimizer | "
        "total | loss at step 0 | max abs loss diff (vs) |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        for s in r.sides:
            ph = {p: statistics.median(d[p] for d in r.phases[s]) for p in PHASES}
            st = r.state[s]
            total = sum(st[k] for k in STATE)
            ref = reference(s)
            verdict = ("agree" if r.loss_diff.get(s, 0) < AGREE_TOL else "DIFFER") if checked else "bf16, not checked"
            diff = "-" if s == ref or s not in r.loss_diff else f"{r.loss_diff[s]:.1e} vs {ref} ({verdict})"
            low, high = r.state_range[s]
            same = "" if low == high else f" (ranks {fmt_bytes(low)} to {fmt_bytes(high)})"
            lines.append(
                f"| {fmt_ranks(r.world)} | {LABEL[s]} | {r.median_tps(s):,.0f} | "
                f"{statistics.median(r.cpu_s[s]) * 1e3:.1f} | {' / '.join(f'{ph[p]:.1f}' for p in PHASES)} | "
                f"{fmt_bytes(st['params'])} | {fmt_bytes(st['grads'])} | {fmt_bytes(st['optim'])} | "
                f"{fmt_bytes(total)}{same} | {r.loss0[s]:.6f} | {diff} |"
            )
    return lines


def ledger_lines(results: list[WorldResult]) -> list[str]:
    lines = [
        "| ranks | loom stage | dp bytes/step/rank (ledger) | dp_bytes_per_step | = | state bytes/rank | "
        "model_state_bytes + padding | = |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in results:
        for s in (s for s in r.sides if s.startswith("loom")):
            held = sum(r.state[s][k] for k in STATE)
            lines.append(
                f"| {fmt_ranks(r.world)} | {s[-1]} | {', '.join(fmt_bytes(b) for b in sorted(r.dp_bytes[s]))} | "
                f"{fmt_bytes(r.formula[s])} | {'yes' if r.bytes_match(s) else 'NO'} | {fmt_bytes(held)} | "
                f"{fmt_bytes(r.state_formula[s])} | {'yes' if held == r.state_formula[s] else 'NO'} |"
            )
    return lines


def round_lines(results: list[WorldResult]) -> list[str]:
    sides = [s for s in SIDES if any(s in r.sides for r in results)]
    pairs = [(a, b) for a, b, _ in PAIRS if a in sides and b in sides]
    head = [
        "ranks",
        "round",
        *(f"{s} tok/s" for s in sides),
        *(f"{a}/{b} ratio, paired" for a, b in pairs),
        "CPU ms/step " + " / ".join(sides),
    ]
    align = ["---:", "---:", *("---:" for _ in sides), *("---" for _ in pairs), "---"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for r in results:
        for i in range(len(r.step_s[r.sides[0]])):
            cells = [str(r.world), str(i + 1)]
            cells += [f"{r.tps(s)[i]:,.0f}" if s in r.sides else "-" for s in sides]
            cells += [
                f"{r.ratios(a, b)[i]:.3f}, {r.paired[a, b][i]:.3f}" if (a, b) in r.paired else "-" for a, b in pairs
            ]
            cells.append(" / ".join(f"{r.cpu_s[s][i] * 1e3:.1f}" if s in r.sides else "-" for s in sides))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


TIMING = (
    "in each round every side starts from a fresh model and the sides run their steps interleaved, the order "
    "rotating step by step; tokens/s = global tokens per step / median of rank 0's whole-step wall time after "
    "the warm-up steps, median over rounds; paired ratio = median over timed steps of the peer's step time / "
    "loom's at the same step; CPU ms/step = rank 0's process CPU time per step (all its threads, gloo's "
    "included). Phase columns (medians, ms): fwd (forward + loss; stage 3 gathers inside), bwd (backward with "
    "the gradient reductions that overlap it; the peers' final waits are inside it), sync (loom's "
    "finish_gradient_sync: the last reductions; peers 0), loss (the loss all-reduce and .item()), opt (clip, "
    "AdamW, zero grads; for loom's and DeepSpeed's stages 1-2 the parameter all-gathers too). State bytes: "
    "rank 0 after the backward of an extra untimed step (gradients reduced, optimizer states allocated), "
    "distinct storages only; where ranks held different totals (uneven shards) their range follows."
)


def interpretation(results: list[WorldResult], cores: int, precision: str) -> list[str]:
    out = []
    over = [r.world for r in results if r.world > cores]
    if over:
        out.append(
            f"Oversubscription: {', '.join(map(str, over))} ranks x 1 thread on {cores} cores, so ranks time-share "
            "the cores (with each other and with gloo's communication threads), and a rank waiting in a collective "
            "may wait for a peer that is not scheduled. Those rows compare the sides under the same contention; "
            "their absolute tokens/s say nothing about scaling."
        )
    for r in results:
        parts = []
        for loom, peer, goal in r.pairs():
            ratio = r.ratio(loom, peer)
            lp = {p: statistics.median(d[p] for d in r.phases[loom]) for p in PHASES}
            pp = {p: statistics.median(d[p] for d in r.phases[peer]) for p in PHASES}
            parts.append(
                f"{LABEL[loom]} runs at {ratio:.3f}x {LABEL[peer]} ({'meets' if ratio >= goal else 'misses'} the "
                f"{goal:.1f} goal; paired {statistics.median(r.paired[loom, peer]):.3f}; slower of the back-to-back "
                f"pair in {sum(q < 1 for q in r.paired[loom, peer])} of {len(r.paired[loom, peer])} rounds): "
                f"fwd {lp['fwd']:.1f} vs {pp['fwd']:.1f} ms, bwd + sync {lp['bwd'] + lp['sync']:.1f} vs "
                f"{pp['bwd'] + pp['sync']:.1f} ms, opt {lp['opt']:.1f} vs {pp['opt']:.1f} ms; state "
                f"{fmt_bytes(sum(r.state[loom][k] for k in STATE))} vs {fmt_bytes(sum(r.state[peer][k] for k in STATE))} "
                "bytes per rank"
            )
        if parts:
            out.append(f"{r.world} ranks: " + "; ".join(parts) + ".")
    if precision == "fp32" and any(r.state.get("loom3") and r.state.get("fsdp2") for r in results):
        out.append(
            "State in fp32: loom keeps the compute parameters (a full buffer at stages 1-2, this rank's slice at "
            "stage 3), which are their own master weights, and two moments (8 bytes per element it owns); FSDP2 "
            "in fp32 likewise steps torch's AdamW on the parameter shards themselves; DeepSpeed keeps an fp32 "
            "partition apart from its parameters (12 bytes per element with the moments). loom's "
            "stage 1 keeps full-size gradients (the paper's P_os: only optimizer states are partitioned); "
            "DeepSpeed's stage 1 reduces gradients into partitions as its stage 2 does."
        )
    return out


def deepspeed_line(results: list[WorldResult], names: list[str], precision: str) -> str:
    wanted = [s for s in names if s.startswith("ds")]
    if not wanted:
        return "DeepSpeed: not run (--sides leaves it out)."
    errors = {r.world: r.ds_error for r in results if r.ds_error}
    if not errors:
        return (
            f"DeepSpeed: {peer_version()} ran on its CPU accelerator (DS_ACCELERATOR=cpu; no oneCCL bindings, "
            f"so its collectives are torch.distributed with gloo), {precision} ZeRO with torch's AdamW as the "
            "client optimizer."
        )
    return (
        "DeepSpeed: DID NOT RUN, so the ds sides are missing: "
        + "; ".join(f"{w} ranks: `{e}`" for w, e in errors.items())
        + f" ({peer_version()})."
    )


def markdown(
    command: str,
    when: str,
    job: str,
    results: list[WorldResult],
    ds_line: str,
    noise: str,
    notes: list[str],
    checked: bool,
) -> str:
    lines = [
        "# ZeRO: loom ZeroOptimizer vs PyTorch FSDP2 and DeepSpeed ZeRO",
        "",
        *head_lines(command, when, machine()),
        f"Source: {source()}",
        "",
        f"Job: {job}",
        "",
        ds_line,
        "",
        *pair_lines(results),
        "",
        "Per side (medians over rounds):",
        "",
        *side_lines(results, checked),
        "",
        "loom's ledger and memory against loom.plan.memory (Psi with padding for the bytes):",
        "",
        *ledger_lines(results),
        "",
        "Per round:",
        "",
        *round_lines(results),
        "",
        *closing_lines(TIMING, noise, notes),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def build_overrides(args: argparse.Namespace) -> list[str]:
    return job_overrides(args, "train.grad_accum=1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_args(p, d_model=256)
    p.add_argument(
        "--micro-batch", type=int, default=2, help="sequences per rank per step (global batch = this x ranks)"
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per side per round")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing")
    p.add_argument(
        "--bucket-mb",
        type=float,
        default=1.0,
        help="loom's stage 1-2 bucket = DeepSpeed's reduce and all-gather bucket (stage 3: one unit per block)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32, or bf16 parameters and gradients with fp32 master weights on every side "
        "(bf16 matmuls are ~15x slower than fp32 on CPUs without native bf16)",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds per world size, each with fresh models")
    p.add_argument("--worlds", default="2,4", help="comma-separated rank counts, one run_ranks each")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--corpus", default="stdlib", help="data.corpus")
    p.add_argument("--out", type=Path, help="also write the result as markdown here")
    args = p.parse_args(argv)
    check_rounds(p, args)
    args.world_sizes = sizes(p, "--worlds", args.worlds, "world size")
    args.side_names = [s for s in SIDES if s in args.sides.split(",")]
    unknown = set(args.sides.split(",")) - set(SIDES)
    if unknown or not args.side_names:
        p.error(f"--sides {args.sides!r}: choose from {', '.join(SIDES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = bench_command("zero.py")
    overrides = build_overrides(args)
    try:
        config, tokenizer = job_config(overrides)
        config.validate()
        prepare_dataset(config.data, tokenizer, log=print)  # tokenise once here; the ranks hit the cache
    except LoomError as exc:
        print(exc, file=sys.stderr)
        return 2
    model, train = config.model, config.train
    params = Transformer(model, seed=train.seed).num_params()
    cores = os.cpu_count() or 1
    job = (
        f"{model.preset} ({model.family}, {model.n_layers} layers, d_model {model.d_model}, {params / 1e6:.2f}M params), "
        f"{args.micro_batch} x {args.seq_len} tokens per rank per step, {args.steps} steps ({args.steps - args.warmup} "
        f"timed) x {args.repeats} rounds per side, {args.precision}, gloo, 1 thread per rank; AdamW lr {train.lr:g} "
        f"(warm-up {train.warmup_steps}, cosine), betas ({train.beta1:g}, {train.beta2:g}), eps {train.eps:g}, weight "
        f"decay {train.weight_decay:g} on matrices, clip {train.grad_clip:g}; loom stage 1-2 buckets and DeepSpeed "
        f"reduce/all-gather buckets {args.bucket_mb:g} MiB; stage 3 units: one per block plus the root (loom, FSDP2 "
        "reshard_after_forward=True, DeepSpeed blocks as z3 leaf modules, persistence threshold 0, max reuse "
        "distance 0, memory_efficient_linear off); sides " + ", ".join(args.side_names)
    )
    print(f"job: {job}")
    print(f"timing: {TIMING}\n")
    load_start = os.getloadavg()[0]
    results = []
    for world in args.world_sizes:
        result = bench_world(world, overrides, args.side_names, args)
        results.append(result)
        if result.ds_error:
            print(f"{world} ranks: DeepSpeed did not run: {result.ds_error}")
        for i in range(args.repeats):
            print(
                f"{world} ranks, round {i + 1}: "
                + ", ".join(f"{s} {result.tps(s)[i]:,.0f}" for s in result.sides)
                + " tok/s; "
                + ", ".join(f"{a}/{b} {result.ratios(a, b)[i]:.3f}" for a, b, _ in result.pairs())
            )
        print(f"{world} ranks: {result.wall_s:.0f} s wall\n")

    ratios = [q for r in results for a, b, _ in r.pairs() for q in r.ratios(a, b)]
    noisy = [
        f"{r.world} ranks {a}/{b}"
        for r in results
        for a, b, _ in r.pairs()
        if max(r.ratios(a, b)) - min(r.ratios(a, b)) > NOISY_SPREAD
    ]
    if ratios:
        noise = noise_head(load_start, cores, ratios) + (
            busy_warning(NOISY_SPREAD, ", ".join(noisy)) if noisy else "." + (ONE_ROUND if args.repeats == 1 else "")
        )
    else:
        noise = f"Noise: 1-minute load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end."
    checked = args.precision == "fp32"
    ds_line = deepspeed_line(results, args.side_names, args.precision)
    notes = interpretation(results, cores, args.precision)
    for lines in (pair_lines(results), side_lines(results, checked), ledger_lines(results)):
        print("\n".join(lines))
        print()
    print(ds_line)
    print(noise)
    for line in notes:
        print(line)
    write_result(args.out, lambda when: markdown(command, when, job, results, ds_line, noise, notes, checked))
    ok = all(r.bytes_match(s) for r in results for s in r.formula) and (
        not checked or all(d < AGREE_TOL for r in results for d in r.loss_diff.values())
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
