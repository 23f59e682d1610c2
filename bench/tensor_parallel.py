"""loom's tensor parallelism against PyTorch's DTensor tensor parallelism on the same multi-rank job.

Both sides train the same model on the same data: ``Transformer`` from one config and seed
(layout-independent init, so loom's shards and DTensor's shards are slices of the same
weights), the same batch on every tp rank (``batch_offsets``/``get_batch`` of the step), the
same AdamW (``build_adamw``'s decay/no-decay groups, fused on CPU), the same lr schedule
(``lr_at``), no gradient clipping on either side. A step is: set lr, forward + loss,
backward, ``.item()`` of the loss, AdamW step, zero grads.

loom: ``Transformer(cfg, seed, tp=TensorParallel(ctx.comm("tp"), sequence_parallel))``,
driven as the trainer drives it: after backward ``tp.sync_sequence_parallel_grads`` and
``sync_replicated_kv_grads`` (both no-ops without SP and replicated KV heads).

DTensor: the plain (tp=1) loom ``Transformer``, parallelised with
``torch.distributed.tensor.parallel.parallelize_module`` on a 1-D ``DeviceMesh`` over the
same tp process group. torch's ``ColwiseParallel``/``RowwiseParallel`` accept only
``nn.Linear``/``nn.Embedding``, so the loom linears and the embedding (at tp=1 plain
modules: ``F.linear``/``F.embedding`` on their own weights) are first swapped for
``nn.Linear``/``nn.Embedding`` holding the same ``Parameter`` objects. The plan, per block:
q/k/v (and gate/up) ``ColwiseParallel``, o/down ``RowwiseParallel`` (local outputs: the
attention's ``.view(batch, seq, -1, head_dim)`` sees this rank's heads), and, as torchtitan's
plan does, ``PrepareModuleInput`` on the attention and the MLP so their column projections
share one ``Replicate`` DTensor input: its gradient is summed locally and all-reduced once
(without it each of Q, K, V all-reduces its own input gradient, 2 extra all-reduces of b*s*h
per layer). The vocabulary is
sharded too: the embedding ``RowwiseParallel`` (rows split by vocabulary, masked lookup,
all-reduce); the (tied or untied) head weight ``Shard(0)``, with the final norm's output made
a ``Replicate`` DTensor so ``F.linear`` gives vocabulary-sharded ``Shard(-1)`` logits, and the
cross-entropy runs under ``loss_parallel()`` (never gathering the logits), as loom's
vocab-parallel loss does. The fused AdamW cannot mix DTensor and plain tensors in one
group, so each of ``build_adamw``'s groups is split in two (same hyper-parameters).
With ``--sequence-parallel`` the norms are ``SequenceParallel``, the embedding and the
row-parallel outputs are reduce-scattered along the sequence (``output_layouts=Shard(1)``),
the attention and MLP inputs all-gathered (the same ``PrepareModuleInput``), the position embedding's
output sliced to the local sequence, and the final norm's output all-gathered to ``Replicate``.

A third side, the no-comm floor, runs loom's shards of each rank with every tp collective
skipped (``LocalComm``): the compute both sides must do. A side's step time minus the floor's
is what its communication and its implementation add.

Timing. Ranks start once per world size (``run_ranks``, gloo, one thread per rank). Each round
builds all sides afresh and runs their steps interleaved: step k of every side back to back,
the order rotating step by step and round by round. A side's step time is rank 0's wall time
of a whole step (the collectives couple the tp ranks every step); its tokens/s is the tokens
of one step (micro_batch x seq_len: every tp rank works on the same batch) over its median
step time after ``--warmup`` steps. The table gives the median over rounds of each side and
the ratio of the medians. loom's wall time inside its tp collectives comes from its ledger
entries' start and end times (for the backward's asynchronous reductions, launch to wait: the
weight-gradient compute they overlap is inside).

Bytes. loom's ledger gives ``comm_bytes_tp`` per step per rank, split by tag: the region
mappings ("tp", "tp-sp"), the vocab-parallel cross-entropy ("tp-ce"), the SP gradient sum
("sp-grads") and replicated-KV gradient sum ("tp-kv-grads"). The mappings are checked
against 8bsh(t-1)/t elements x 4 bytes x (layers + 1/2): per layer two all-reduces forward
(attention and MLP exits) and two backward (their entries) of b*s*h fp32 values, each
2(t-1)/t x bsh under the ring model (with SP, an all-gather plus a reduce-scatter of the same
volume each); the embedding's exit (forward) and the head's entry (backward) are one more
all-reduce each, half a layer. In one extra step after the timed rounds both sides' collectives
are counted and sized: loom's from its ledger, DTensor's by a dispatch mode that sees the
functional collectives DTensor issues (as torch's ``CommDebugMode`` does) and prices each with
loom's ring cost model (``loom.distributed.comm.model_bytes``).

    python bench/tensor_parallel.py --out bench/results/tensor_parallel.md
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import torch
from common import (
    StepRecord,
    add_model_args,
    bench_command,
    busy_warning,
    check_rounds,
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
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.utils._python_dispatch import TorchDispatchMode

from loom.config import Config
from loom.distributed.comm import Handle, model_bytes
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.errors import LoomError
from loom.model.attention import sync_replicated_kv_grads
from loom.model.transformer import Transformer
from loom.optim.adamw import build_adamw
from loom.optim.lr import lr_at
from loom.parallel.tensor import TensorParallel
from loom.train.batches import batch_offsets, get_batch
from loom.train.data import prepare_dataset
from loom.train.trainer import TRAIN_STREAM

GOAL = 1.3  # loom / DTensor tokens/s at or above this
AGREE_TOL = 1e-5  # |loss difference| at step 0 (and over the whole curve) for "agree"
NOISY_SPREAD = 0.10  # per-round ratios further apart than this: the machine was busy
PHASES = ("fwd", "bwd", "opt")  # fwd: forward + loss; bwd: backward (+ loom's tp grad syncs); opt: item, AdamW, zero
SIDES = ("loom", "dtensor", "nocomm")
MAPPING_TAGS = ("tp", "tp-sp")
LEDGER_WINDOW = 1000  # ledger entries looked back at after a step (a step makes a few dozen)


@dataclass
class Run(StepRecord):
    """One side's per-step record for one round, as one rank saw it (and what only this bench keeps)."""

    phases: ClassVar[tuple[str, ...]] = PHASES
    tp_bytes: list[dict[str, int | float]] = field(default_factory=list)  # loom only: ledger bytes by tag
    comm_s: list[float] = field(default_factory=list)  # loom only: wall time inside tp collectives (ledger)

    def median_comm_s(self, warmup: int) -> float:
        return statistics.median(self.comm_s[warmup:]) if self.comm_s else 0.0


# ----------------------------------------------------------------------------- the sides


def set_lr(optimizer: torch.optim.Optimizer, config: Config, step: int) -> None:
    train = config.train
    lr = lr_at(step, train.lr, train.warmup_steps, train.steps, train.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr


class LoomSide:
    """loom's tensor-parallel model, stepped as the trainer steps it (fp32, no accumulation, no clip)."""

    name = "loom"

    def __init__(self, config: Config, ctx, comm=None) -> None:
        self.config = config
        self.ledger = ctx.ledger
        self.tp = TensorParallel(comm or ctx.comm("tp"), config.parallel.sequence_parallel)
        self.model = Transformer(config.model, seed=config.train.seed, device=ctx.device, tp=self.tp)
        self.optimizer = build_adamw(self.model, config.train, ctx.device)
        self.run = Run()

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.ledger.take_step_totals()  # only this side sends through the ledger; start each step clean
        recent = self.ledger.recent(1)
        first_seq = recent[-1].seq + 1 if recent else 1
        c0, t0 = time.process_time(), time.perf_counter()
        set_lr(self.optimizer, self.config, step)
        loss = self.model.loss(x, y)
        t1 = time.perf_counter()
        loss.backward()
        self.tp.sync_sequence_parallel_grads(self.model)
        sync_replicated_kv_grads(self.model, self.tp)
        t2 = time.perf_counter()
        self.run.losses.append(loss.item())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        cpu = time.process_time() - c0
        total = self.ledger.take_step_totals()["comm_bytes_tp"]
        by_tag, comm_s = step_bytes_by_tag(self.ledger, first_seq)
        by_tag["total"] = total
        self.run.tp_bytes.append(by_tag)
        self.run.comm_s.append(comm_s)
        self.run.record(cpu, t0, t1, t2, t3)

    def comm_counts(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[dict[str, int], int | float]:
        """Collectives of one extra step by op and tag, and the bytes this rank sent, from the ledger."""
        recent = self.ledger.recent(1)
        first_seq = recent[-1].seq + 1 if recent else 1
        self.step(step, x, y)
        entries = [e for e in self.ledger.recent(LEDGER_WINDOW) if e.seq >= first_seq and e.group == "tp"]
        return dict(Counter(f"{e.op} ({e.tag})" for e in entries)), sum(e.bytes_sent for e in entries)


def step_bytes_by_tag(ledger, first_seq: int) -> tuple[dict[str, int | float], float]:
    """Bytes this rank sent on tp since ledger entry ``first_seq``, by tag, and the seconds spent in those calls."""
    sums: dict[str, Fraction] = {}
    seconds = 0.0
    for e in ledger.recent(LEDGER_WINDOW):
        if e.seq >= first_seq and e.group == "tp":
            sums[e.tag] = sums.get(e.tag, 0) + Fraction(e.bytes_sent)
            seconds += (e.finished or e.started) - e.started
    return {tag: int(v) if v.denominator == 1 else float(v) for tag, v in sums.items()}, seconds


class LocalComm:
    """A stand-in tp group of ``size`` ranks whose collectives move nothing, for the no-comm floor.

    all_reduce leaves the tensor as it is; all_gather and reduce_scatter do the local copy
    (this rank's piece into every slot / this rank's chunk out), so shapes, and the work
    around the collectives, are loom's own. With ``async_op`` each returns a handle that is
    already done, as ``Comm``'s do.
    """

    name = "tp"

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank

    def all_reduce(self, t: torch.Tensor, op: str = "sum", async_op: bool = False, tag: str = "") -> Handle | None:
        return DONE if async_op else None

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False, tag: str = ""
    ) -> Handle | None:
        output.view(self.size, -1).copy_(input.reshape(1, -1))
        return DONE if async_op else None

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, op: str = "sum", async_op: bool = False, tag: str = ""
    ) -> Handle | None:
        output.copy_(input.reshape(self.size, -1)[self.rank].view_as(output))
        return DONE if async_op else None


DONE = Handle(None, None, None)  # a finished call, for LocalComm's async_op


class NoCommSide(LoomSide):
    """loom's shards of this rank with every tp collective skipped: the compute floor under both sides.

    Its losses are meaningless (partial sums are never summed); only its time is used.
    """

    name = "nocomm"

    def __init__(self, config: Config, ctx) -> None:
        tp = ctx.comm("tp")
        super().__init__(config, ctx, LocalComm(tp.size, tp.rank))


def _as_linear(m: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding the very parameters of a tp=1 loom Column/RowParallelLinear."""
    out_features, in_features = m.weight.shape
    lin = nn.Linear(in_features, out_features, bias=m.bias is not None, device="meta")
    lin.weight = m.weight
    lin.bias = m.bias
    return lin


def _as_embedding(m: nn.Module) -> nn.Embedding:
    """An ``nn.Embedding`` holding the very weight of a tp=1 ``VocabParallelEmbedding``."""
    emb = nn.Embedding(*m.weight.shape, device="meta")
    emb.weight = m.weight
    return emb


def dtensor_plan(model: Transformer, sequence_parallel: bool) -> dict[str, object]:
    """Swap loom's tp=1 linears/embedding for torch modules (same Parameters); return the TP plan."""
    cfg = model.cfg
    sp = sequence_parallel
    seq_out = Shard(1) if sp else Replicate()
    plan: dict[str, object] = {"tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq_out)}
    model.tok_emb = _as_embedding(model.tok_emb)
    if model.lm_head is not None:
        # Transformer.forward reads lm_head.weight directly: only its partition (Shard(0)) matters
        model.lm_head = _as_linear(model.lm_head)
        plan["lm_head"] = ColwiseParallel()
    if sp and model.pos_emb is not None:
        # each rank adds the positions of its own slice of the sequence
        plan["pos_emb"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(0))
    col = ("gate_proj", "up_proj") if cfg.family == "llama" else ("up_proj",)
    for key, block in model.blocks.named_children():  # a ModuleList or a ModuleDict keyed by layer index
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.attn, name, _as_linear(getattr(block.attn, name)))
        for name in (*col, "down_proj"):
            setattr(block.mlp, name, _as_linear(getattr(block.mlp, name)))
        prefix = f"blocks.{key}"
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"{prefix}.attn.{name}"] = ColwiseParallel()
        plan[f"{prefix}.attn.o_proj"] = RowwiseParallel(output_layouts=seq_out)
        for name in col:
            plan[f"{prefix}.mlp.{name}"] = ColwiseParallel()
        plan[f"{prefix}.mlp.down_proj"] = RowwiseParallel(output_layouts=seq_out)
        # one Replicate DTensor input shared by Q, K, V (gate, up), as torchtitan's plan does: their input
        # gradients are summed locally and all-reduced once (else each projection all-reduces its own)
        plan[f"{prefix}.attn"] = PrepareModuleInput(
            input_layouts=(seq_out, None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=False,
        )
        plan[f"{prefix}.mlp"] = PrepareModuleInput(
            input_layouts=(seq_out,), desired_input_layouts=(Replicate(),), use_local_output=False
        )
        if sp:
            plan[f"{prefix}.attn_norm"] = SequenceParallel(use_local_output=True)
            plan[f"{prefix}.mlp_norm"] = SequenceParallel(use_local_output=True)
    if sp:
        plan["final_norm"] = SequenceParallel(use_local_output=False)
    return plan


def dtensor_adamw(model: nn.Module, config: Config, device: torch.device) -> torch.optim.AdamW:
    """``build_adamw``'s optimizer with each group split into DTensor and plain parameters.

    The fused kernel takes one kind of tensor per call; the split groups keep every setting.
    """
    optimizer = build_adamw(model, config.train, device)
    groups = []
    for group in optimizer.param_groups:
        for distributed in (True, False):
            params = [p for p in group["params"] if isinstance(p, DTensor) == distributed]
            if params:
                groups.append({**group, "params": params})
    optimizer.param_groups.clear()  # no state yet: regrouping loses nothing
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer


class DTensorSide:
    """The tp=1 loom model under ``parallelize_module`` (see the module docstring for the plan)."""

    name = "dtensor"

    def __init__(self, config: Config, ctx, mesh: DeviceMesh) -> None:
        self.config = config
        self.tp_size = mesh.size()
        sp = config.parallel.sequence_parallel
        self.model = Transformer(config.model, seed=config.train.seed, device=ctx.device)
        parallelize_module(self.model, mesh, dtensor_plan(self.model, sp))
        # the head multiplies the final norm's output by the Shard(0) vocabulary weight: make it a
        # Replicate DTensor (all-gathered along the sequence under SP) so the logits come out Shard(-1)
        parallelize_module(
            self.model.final_norm,
            mesh,
            PrepareModuleOutput(
                output_layouts=Shard(1) if sp else Replicate(),
                desired_output_layouts=Replicate(),
                use_local_output=False,
            ),
        )
        self.optimizer = dtensor_adamw(self.model, config, ctx.device)
        self.run = Run()

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        set_lr(self.optimizer, self.config, step)
        with loss_parallel():  # the backward of the loss must run under it too
            loss = self.model.loss(x, y)
            t1 = time.perf_counter()
            loss.backward()
        t2 = time.perf_counter()
        self.run.losses.append((loss.full_tensor() if isinstance(loss, DTensor) else loss).item())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        cpu = time.process_time() - c0
        self.run.record(cpu, t0, t1, t2, t3)

    def comm_counts(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[dict[str, int], int | float]:
        """Collectives of one extra step by op, and the bytes this rank sent under loom's cost model."""
        with CollectiveCounter(self.tp_size) as counter:
            self.step(step, x, y)
        return dict(counter.counts), counter.bytes_sent


class CollectiveCounter(TorchDispatchMode):
    """Counts and sizes the functional collectives DTensor issues on a tp group of ``size`` ranks.

    A mode runs before tensor subclasses: returning ``NotImplemented`` for DTensor ops lets
    DTensor run and desugar them into collectives on local tensors, which then come here (the
    trick torch's ``CommDebugMode`` uses; its module tracker is left out, it trips on a module
    called more than once per forward, such as the shared rotary embedding).
    """

    # functional op -> loom's cost-model op; the message size S is the input's bytes, x size for all-gather
    OPS = {
        "all_reduce": "all_reduce",
        "all_gather_into_tensor": "all_gather",
        "reduce_scatter_tensor": "reduce_scatter",
        "all_to_all_single": "all_to_all",
    }

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.counts: Counter[str] = Counter()
        self.bytes_sent: int | float = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(t is DTensor for t in types):
            return NotImplemented
        name = func._overloadpacket.__name__
        if func.namespace == "_c10d_functional" and name in self.OPS:
            t = args[0]
            nbytes = t.numel() * t.element_size() * (self.size if name == "all_gather_into_tensor" else 1)
            self.counts[name] += 1
            self.bytes_sent += model_bytes(self.OPS[name], self.size, nbytes)
        elif func.namespace in ("_c10d_functional", "c10d") and name not in ("wait_tensor", "_wrap_tensor_autograd"):
            self.counts[name] += 1  # any other collective: counted, not sized
        return func(*args, **kwargs)


def rank_main(overrides: list[str], repeats: int, warmup: int) -> dict:
    """Per rank: the same batches as every other tp rank; per round fresh sides, their steps interleaved."""
    config, tokenizer = job_config(overrides)
    ctx = init_distributed(config.parallel)
    data = prepare_dataset(config.data, tokenizer)  # the parent tokenised it: a cache hit
    train = config.train
    batches = []
    for step in range(train.steps):
        offsets = batch_offsets(len(data.train), train.seq_len, train.micro_batch, train.seed, step, TRAIN_STREAM)
        batches.append(get_batch(data.train, train.seq_len, offsets, ctx.device))
    mesh = DeviceMesh.from_group(ctx.comm("tp").group, ctx.device.type)
    with torch.no_grad():  # the single-process loss at step 0, for the parity check
        single_loss = Transformer(config.model, seed=train.seed, device=ctx.device).loss(*batches[0]).item()
    world = ctx.comm("world")
    rounds = []
    for r in range(repeats):
        sides = [LoomSide(config, ctx), DTensorSide(config, ctx, mesh), NoCommSide(config, ctx)]
        gc.collect()
        world.barrier()
        for step, (x, y) in enumerate(batches):
            first = (r + step) % len(sides)
            for side in sides[first:] + sides[:first]:
                side.step(step, x, y)
        world.barrier()
        rounds.append({side.name: side.run for side in sides})
    counts = {side.name: side.comm_counts(*batches[warmup], warmup) for side in sides[:2]}
    params = Transformer(config.model, seed=train.seed).num_params()
    step0 = {name: [rd[name].losses[0] for rd in rounds] for name in ("loom", "dtensor")}
    if ctx.is_main:
        return {"rounds": rounds, "params": params, "single_loss": single_loss, "counts": counts}
    # other ranks: their byte counts and step-0 losses, to check every rank sends and sees the same
    tp_bytes = sorted({tuple(sorted(b.items())) for rd in rounds for b in rd["loom"].tp_bytes})
    return {"tp_bytes": tp_bytes, "single_loss": single_loss, "step0": step0}


# ----------------------------------------------------------------------------- report


@dataclass
class WorldResult:
    """One world size (= tp size): per-round medians of each side, losses, bytes and collective counts."""

    world: int
    tokens_per_step: int
    step_s: dict[str, list[float]]  # side -> per-round median step seconds
    cpu_s: dict[str, list[float]]  # side -> per-round median CPU seconds per step (rank 0, all threads)
    phases: dict[str, list[dict[str, float]]]  # side -> per-round median phase ms
    paired: list[float]  # per round: median over timed steps of DTensor step time / loom step time
    comm_s: list[float]  # per round: loom's median wall seconds per step inside tp collectives (ledger)
    step0: dict[str, float]  # max over ranks and rounds of |a - b| at step 0 for the three pairs
    curve_diff: float  # max |loom - dtensor| over all steps and rounds (rank 0)
    single_loss: float
    tp_bytes: set  # distinct per-step {tag: bytes} records over ranks, rounds and steps (as sorted tuples)
    formula: Fraction  # 8bsh(t-1)/t x 4 x (layers + 1/2)
    ce_formula: Fraction  # all-reduces of 3 x b*s fp32 (the max, then sum-exp and target logit together)
    counts: dict[str, tuple[dict[str, int], int | float]]  # side -> (collectives by op, bytes) of one step
    wall_s: float

    def tps(self, side: str) -> list[float]:
        return [self.tokens_per_step / s for s in self.step_s[side]]

    def median_tps(self, side: str) -> float:
        return statistics.median(self.tps(side))

    @property
    def ratio(self) -> float:
        return self.median_tps("loom") / self.median_tps("dtensor")

    @property
    def verdict(self) -> str:
        """'meets' / 'misses' if the ratio of medians and the median paired ratio agree, else 'straddles'."""
        paired = statistics.median(self.paired)
        if self.ratio >= GOAL and paired >= GOAL:
            return "meets"
        if self.ratio < GOAL and paired < GOAL:
            return "misses"
        return "straddles"

    def over_floor_ms(self, side: str) -> float:
        """Median over rounds of (side's median step - the no-comm floor's), in ms."""
        return statistics.median(a - b for a, b in zip(self.step_s[side], self.step_s["nocomm"])) * 1e3

    def cpu_ms(self, side: str) -> float:
        return statistics.median(self.cpu_s[side]) * 1e3

    @property
    def cpu_ratio(self) -> float:
        """DTensor's CPU time per step over loom's: the work each does, insensitive to waiting for a core."""
        return self.cpu_ms("dtensor") / self.cpu_ms("loom")

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.tps("loom"), self.tps("dtensor"))]

    @property
    def bytes_record(self) -> dict[str, int | float] | None:
        """The one per-step byte record every rank and step agreed on, or None if they differ."""
        return dict(next(iter(self.tp_bytes))) if len(self.tp_bytes) == 1 else None

    def mapping_bytes(self) -> list[Fraction]:
        return sorted({sum((Fraction(v) for k, v in rec if k in MAPPING_TAGS), Fraction(0)) for rec in self.tp_bytes})

    @property
    def bytes_match(self) -> bool:
        return self.mapping_bytes() == [self.formula]

    @property
    def agree(self) -> bool:
        return max(self.step0.values()) < AGREE_TOL


def bench_world(world: int, overrides: list[str], args: argparse.Namespace, config: Config) -> WorldResult:
    began = time.perf_counter()
    # a generous bound: startup, then every step of both sides and rounds at a pessimistic 3 s per rank pair
    timeout = 180 + 3.0 * len(SIDES) * (args.repeats * args.steps + 1) * max(1, world // 2)
    overrides = [*overrides, f"parallel.tp={world}"]
    results = run_ranks(rank_main, world, args=(overrides, args.repeats, args.warmup), timeout_s=timeout)
    wall = time.perf_counter() - began
    main = results[0]
    rounds = main["rounds"]
    step0_by_rank = [{s: [rd[s].losses[0] for rd in rounds] for s in ("loom", "dtensor")}]
    step0_by_rank += [r["step0"] for r in results[1:]]
    singles = [r["single_loss"] for r in results]
    step0 = {"loom - dtensor": 0.0, "loom - tp=1": 0.0, "dtensor - tp=1": 0.0}
    for losses, single in zip(step0_by_rank, singles):
        for a, b in zip(losses["loom"], losses["dtensor"]):
            step0["loom - dtensor"] = max(step0["loom - dtensor"], abs(a - b))
            step0["loom - tp=1"] = max(step0["loom - tp=1"], abs(a - single))
            step0["dtensor - tp=1"] = max(step0["dtensor - tp=1"], abs(b - single))
    curve = max(abs(a - b) for rd in rounds for a, b in zip(rd["loom"].losses, rd["dtensor"].losses, strict=True))
    tp_bytes = {tuple(sorted(b.items())) for rd in rounds for b in rd["loom"].tp_bytes}
    for other in results[1:]:
        tp_bytes |= set(other["tp_bytes"])
    m, s, h, layers = args.micro_batch, args.seq_len, config.model.d_model, config.model.n_layers
    formula = Fraction(8 * m * s * h * (world - 1), world) * 4 * (Fraction(layers) + Fraction(1, 2))
    ce_formula = 3 * Fraction(2 * (world - 1), world) * m * s * 4
    return WorldResult(
        world,
        m * s,
        {side: [rd[side].median_step_s(args.warmup) for rd in rounds] for side in SIDES},
        {side: [rd[side].median_cpu_s(args.warmup) for rd in rounds] for side in SIDES},
        {side: [rd[side].median_phase_ms(args.warmup) for rd in rounds] for side in SIDES},
        [paired_ratio(rd["loom"], rd["dtensor"], args.warmup) for rd in rounds],
        [rd["loom"].median_comm_s(args.warmup) for rd in rounds],
        step0,
        curve,
        singles[0],
        tp_bytes,
        formula,
        ce_formula,
        main["counts"],
        wall,
    )


def _other_bytes(r: WorldResult) -> str:
    """The non-mapping tags of loom's per-step tp traffic, e.g. 'tp-ce 18,432'."""
    rec = r.bytes_record
    if rec is None:
        return "differ by rank/step"
    parts = [f"{k} {fmt_bytes(v)}" for k, v in sorted(rec.items()) if k not in (*MAPPING_TAGS, "total")]
    return ", ".join(parts) or "none"


def table_lines(results: list[WorldResult]) -> list[str]:
    lines = [
        "| ranks (tp) | loom tokens/s | DTensor tokens/s | ratio (loom / DTensor) | no-comm floor tokens/s | "
        "over the floor ms/step (loom / DTensor) | loom in tp collectives ms/step | "
        "CPU ms/step (loom / DTensor / floor) | CPU ratio (DTensor / loom) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {fmt_ranks(r.world)} | {r.median_tps('loom'):,.0f} | {r.median_tps('dtensor'):,.0f} | {r.ratio:.3f} | "
            f"{r.median_tps('nocomm'):,.0f} | {r.over_floor_ms('loom'):.1f} / {r.over_floor_ms('dtensor'):.1f} | "
            f"{statistics.median(r.comm_s) * 1e3:.1f} | {' / '.join(f'{r.cpu_ms(s):.1f}' for s in SIDES)} | "
            f"{r.cpu_ratio:.3f} |"
        )
    return lines


def bytes_lines(results: list[WorldResult]) -> list[str]:
    lines = [
        "| ranks (tp) | loom comm_bytes_tp /step/rank | of it mappings (tp, tp-sp) | 8bsh(t-1)/t x 4 B x (L + 1/2) | "
        "= formula | rest of comm_bytes_tp | step-0 loss: loom - DTensor / loom - tp=1 / DTensor - tp=1 | "
        "loss curves: max abs loom - DTensor |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | ---: |",
    ]
    for r in results:
        rec = r.bytes_record
        total = fmt_bytes(rec["total"]) if rec is not None else "differ"
        mapping = ", ".join(fmt_bytes(b) for b in r.mapping_bytes())
        verdict = "agree" if r.agree else "DIFFER"
        lines.append(
            f"| {r.world} | {total} | {mapping} | {fmt_bytes(r.formula)} | {'yes' if r.bytes_match else 'NO'} | "
            f"{_other_bytes(r)} | {' / '.join(f'{v:.1e}' for v in r.step0.values())} ({verdict}) | "
            f"{r.curve_diff:.1e} |"
        )
    return lines


def round_lines(results: list[WorldResult]) -> list[str]:
    phases = "/".join(PHASES)
    lines = [
        f"| ranks | round | loom tokens/s | DTensor tokens/s | ratio | paired ratio | no-comm tokens/s | "
        f"loom in collectives ms | CPU ms/step loom / DTensor / floor | loom ms {phases} | DTensor ms {phases} |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in results:
        cpu = zip(*(r.cpu_s[s] for s in SIDES))
        rows = zip(
            r.tps("loom"),
            r.tps("dtensor"),
            r.paired,
            r.tps("nocomm"),
            r.comm_s,
            cpu,
            r.phases["loom"],
            r.phases["dtensor"],
        )
        for i, (lt, dt, pr, nt, cs, c, lp, dp) in enumerate(rows, 1):
            lines.append(
                f"| {r.world} | {i} | {lt:,.0f} | {dt:,.0f} | {lt / dt:.3f} | {pr:.3f} | {nt:,.0f} | {cs * 1e3:.1f} | "
                f"{' / '.join(f'{v * 1e3:.1f}' for v in c)} | "
                f"{' / '.join(f'{lp[p]:.1f}' for p in PHASES)} | {' / '.join(f'{dp[p]:.1f}' for p in PHASES)} |"
            )
    return lines


def count_lines(results: list[WorldResult]) -> list[str]:
    lines = [
        "| ranks | loom collectives per step (ledger: op (tag)) | loom tp bytes/rank | "
        "DTensor collectives per step (functional ops) | DTensor bytes/rank (same cost model) |",
        "| ---: | --- | ---: | --- | ---: |",
    ]
    for r in results:
        (lc, lb), (dc, db) = r.counts["loom"], r.counts["dtensor"]
        fmt = lambda d: ", ".join(f"{k} x{n}" for k, n in sorted(d.items())) or "none"  # noqa: E731
        lines.append(f"| {r.world} | {fmt(lc)} | {fmt_bytes(lb)} | {fmt(dc)} | {fmt_bytes(db)} |")
    return lines


TIMING = (
    "in each round loom, DTensor and the no-comm floor start from fresh models and run their steps interleaved, "
    "the order rotating step by step (and round by round); tokens/s = tokens per step (micro_batch x seq_len; all "
    "tp ranks work on the same batch) / median of rank 0's whole-step wall time after the warm-up steps; paired "
    "ratio = median over timed steps of DTensor's step time / loom's at the same step. The no-comm floor is loom's "
    "shards of each rank with every tp collective skipped (all-reduce: nothing; all-gather / reduce-scatter: the "
    "local copy): what remains is the compute both sides must do, and 'over the floor' = a side's median step "
    "time minus the floor's is what communication and the implementation add. loom in tp collectives = wall time "
    "inside its ledger's tp calls per step (transfer plus waiting for the peers; an asynchronous call counts from "
    "launch to wait, the compute it overlaps included). CPU ms/step = rank 0's process "
    "CPU time per step (all its threads, gloo's included): the work done, insensitive to waiting for a core. A step "
    "is lr, forward + loss, backward (loom: + its tp gradient syncs), loss .item(), AdamW step, zero grads; batches "
    "are cut before timing. Phase columns are per-round medians in ms: fwd (forward + loss), bwd (backward), opt "
    "(.item(), AdamW, zero grads)."
)


def interpretation(results: list[WorldResult], cores: int, config: Config, sp: bool) -> list[str]:
    out = []
    over = [r.world for r in results if r.world > cores]
    if over:
        out.append(
            f"Oversubscription: {', '.join(map(str, over))} ranks x 1 thread on {cores} cores, so ranks time-share "
            "the cores (with each other and with gloo's threads), and a rank waiting in a collective may wait for a "
            "peer that is not scheduled. Those rows compare loom and DTensor under the same contention; their "
            "absolute tokens/s say nothing about scaling."
        )
    out.append(
        "What each side shards: both split attention heads and the MLP (column then row), the vocabulary of the "
        "embedding (masked lookup + all-reduce) and of the "
        + ("tied " if config.model.tied else "")
        + "head, and compute the cross-entropy on vocabulary-sharded logits (loom: its vocab-parallel loss; "
        "DTensor: loss_parallel), so both do the same arithmetic per rank. loom pads the vocabulary to a multiple "
        "of t; DTensor shards it unevenly. "
        + (
            "With sequence parallelism the norms run on sequence slices on both sides (DTensor: SequenceParallel)."
            if sp
            else "Norms, position embeddings and row-parallel biases are replicated on both sides."
        )
    )
    for r in results:
        lp = {p: statistics.median(d[p] for d in r.phases["loom"]) for p in PHASES}
        dp = {p: statistics.median(d[p] for d in r.phases["dtensor"]) for p in PHASES}
        out.append(
            f"{r.world} ranks: loom runs at {r.ratio:.3f}x DTensor's tokens/s ({r.verdict} the {GOAL} goal"
            f"{': the ratio of medians and the paired ratio fall on either side' if r.verdict == 'straddles' else ''}; "
            f"paired per-step ratio {statistics.median(r.paired):.3f}; CPU time per step {r.cpu_ratio:.3f}x in loom's "
            f"favour: "
            f"{r.cpu_ms('loom'):.1f} vs {r.cpu_ms('dtensor'):.1f} ms, the no-comm floor {r.cpu_ms('nocomm'):.1f} ms). "
            f"Over the floor loom adds {r.over_floor_ms('loom'):.1f} ms/step of wall time and "
            f"{r.cpu_ms('loom') - r.cpu_ms('nocomm'):.1f} ms of CPU, DTensor {r.over_floor_ms('dtensor'):.1f} and "
            f"{r.cpu_ms('dtensor') - r.cpu_ms('nocomm'):.1f} ms; loom spends {statistics.median(r.comm_s) * 1e3:.1f} "
            f"ms/step inside its tp collectives (transfer plus waiting for peers; while it waits, other processes "
            f"use the core, so on a busy machine this need not stay below its wall time over the floor); with loom's "
            f"communication free the ratio could reach {r.median_tps('nocomm') / r.median_tps('dtensor'):.3f} (the "
            f"floor's tokens/s over DTensor's; {r.cpu_ms('dtensor') / r.cpu_ms('nocomm'):.3f} in CPU time). Forward "
            f"{lp['fwd']:.1f} vs {dp['fwd']:.1f} ms, backward {lp['bwd']:.1f} vs {dp['bwd']:.1f} ms, item + AdamW + "
            f"zero {lp['opt']:.1f} vs {dp['opt']:.1f} ms (loom vs DTensor). loom's mapping bytes "
            f"{'equal' if r.bytes_match else 'DIFFER from'} 8bsh(t-1)/t x 4 x (L + 1/2); its cross-entropy adds 2 "
            f"all-reduces of b*s and 2 x b*s fp32 ({fmt_bytes(r.ce_formula)} B)."
        )
    return out


def markdown(command: str, when: str, job: str, results: list[WorldResult], noise: str, notes: list[str]) -> str:
    lines = [
        "# Tensor parallelism: loom vs PyTorch DTensor (parallelize_module)",
        "",
        *head_lines(command, when, machine()),
        f"Job: {job}",
        "",
        *table_lines(results),
        "",
        *bytes_lines(results),
        "",
        "Bytes: per rank per step, from loom's ledger (`take_step_totals()['comm_bytes_tp']`, split by tag). "
        "b = micro-batch, s = sequence length, h = d_model, t = tp size, L = layers; the formula counts the region "
        "mappings only: per layer 2 all-reduces forward + 2 backward of b*s*h fp32 (8bsh(t-1)/t elements sent "
        "under the ring model; with SP all-gathers + reduce-scatters of the same volume), plus the embedding's "
        "exit (forward) and the head's entry (backward), one all-reduce each = 1/2 layer. The rest is the "
        "vocab-parallel cross-entropy (tp-ce: one all-gather of each rank's max, sum of exp and target logit, "
        "3 x b*s fp32 per rank) and, with SP, the norm/bias gradient sum "
        "(sp-grads).",
        "",
        "Collectives in one step (an extra step after the timed rounds; bytes sent per rank under the ring model "
        "of `loom.distributed.comm`):",
        "",
        *count_lines(results),
        "",
        "Per round (medians above):",
        "",
        *round_lines(results),
        "",
        *closing_lines(TIMING, noise, notes),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def build_overrides(args: argparse.Namespace) -> list[str]:
    return job_overrides(
        args,
        "train.grad_accum=1",
        "train.grad_clip=0",
        f"parallel.sequence_parallel={'true' if args.sequence_parallel else 'false'}",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_args(p, layers=4, d_model=256)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per step (the same on every tp rank)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per side per round")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=3, help="rounds per world size, each with fresh models")
    p.add_argument("--worlds", default="2,4", help="comma-separated tp sizes (= ranks), one run_ranks each")
    p.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism on both sides")
    p.add_argument("--corpus", default="stdlib", help="data.corpus")
    p.add_argument("--out", type=Path, help="also write the result as markdown here")
    args = p.parse_args(argv)
    check_rounds(p, args)
    args.world_sizes = sizes(p, "--worlds", args.worlds, "tp size")
    return args


def check_layout(config: Config, worlds: list[int], sequence_parallel: bool) -> str | None:
    """Why a tp size cannot run on both sides, or None. DTensor's colwise split needs whole K/V heads per rank."""
    model = config.model
    for t in worlds:
        if model.n_heads % t or model.kv_heads % t:
            return (
                f"tp={t} must divide model.n_heads={model.n_heads} and the K/V heads ({model.kv_heads}) for the "
                f"DTensor side (it splits K/V columns evenly); choose --heads or --worlds accordingly."
            )
        if sequence_parallel and config.train.seq_len % t:
            return f"--seq-len {config.train.seq_len} is not divisible by tp={t} (sequence parallelism splits it)."
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = bench_command("tensor_parallel.py")
    overrides = build_overrides(args)
    try:
        for world in args.world_sizes:  # loom's own checks of each layout (heads, sequence vs tp)
            config, tokenizer = job_config([*overrides, f"parallel.tp={world}"])
            config.validate()
        prepare_dataset(config.data, tokenizer, log=print)  # tokenise once here; the ranks hit the cache
    except LoomError as exc:
        print(exc, file=sys.stderr)
        return 2
    problem = check_layout(config, args.world_sizes, args.sequence_parallel)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    model = config.model
    params = Transformer(model, seed=config.train.seed).num_params()
    cores = os.cpu_count() or 1
    job = (
        f"{model.preset} ({model.family}, {model.n_layers} layers, d_model {model.d_model}, {model.n_heads} heads, "
        f"vocab {model.vocab_size}, {params / 1e6:.2f}M params), micro-batch {args.micro_batch} x {args.seq_len} "
        f"tokens per step on every tp rank, {args.steps} steps ({args.steps - args.warmup} timed) x {args.repeats} "
        f"rounds per side, sequence parallel {'on' if args.sequence_parallel else 'off'}, fp32, AdamW (fused), "
        "no clipping, gloo, 1 thread per rank"
    )
    print(f"job: {job}")
    print(f"timing: {TIMING}\n")
    load_start = os.getloadavg()[0]
    results = []
    for world in args.world_sizes:
        result = bench_world(world, overrides, args, config)
        results.append(result)
        rows = zip(result.tps("loom"), result.tps("dtensor"), result.paired, result.tps("nocomm"))
        for i, (lt, dt, pr, nt) in enumerate(rows, 1):
            print(
                f"{world} ranks, round {i}: loom {lt:,.0f} tok/s, DTensor {dt:,.0f} tok/s, ratio {lt / dt:.3f}, "
                f"paired {pr:.3f}; no-comm floor {nt:,.0f} tok/s"
            )
        print(f"{world} ranks: {result.wall_s:.0f} s wall\n")

    ratios = [q for r in results for q in r.ratios]
    noisy = [r.world for r in results if max(r.ratios) - min(r.ratios) > NOISY_SPREAD]
    noise = noise_head(load_start, cores, ratios) + (
        busy_warning(NOISY_SPREAD, f"{', '.join(map(str, noisy))} ranks") if noisy else "."
    )
    notes = interpretation(results, cores, config, args.sequence_parallel)
    print("\n".join(table_lines(results)))
    print()
    print("\n".join(bytes_lines(results)))
    print()
    print("\n".join(count_lines(results)))
    print()
    print(noise)
    for line in notes:
        print(line)
    write_result(args.out, lambda when: markdown(command, when, job, results, noise, notes))
    ok = all(r.bytes_match and r.agree for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
