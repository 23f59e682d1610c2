"""The wiring point: everything one rank runs, built from the config in one place.

:func:`build_rank` decides, in this order, and nowhere else:

1. the batch shape: ``global_batch = micro_batch * grad_accum * dp``;
2. the pipeline stages this rank holds (``rank_stages``: chunk c of pp rank r is virtual
   stage c * pp + r), and whether there is a pipeline at all;
3. the tensor-parallel region: the tp group, sequence parallelism, and zero-bubble's
   store of deferred weight gradients (a schedule that splits the backward);
4. the dropout streams (shared within a tp group, own per tp rank), and what the model
   recomputes in backward (``train.recompute``; ``recompute_layers = "auto"`` asks the
   planner's memory model for the fewest blocks that fit ``train.memory_budget_gb``);
5. the model: this rank's layers and tp shard, initialised layout-independently (every rank
   draws its slice of the same weights: no broadcast);
6. the pipeline rank (schedule, runtime, tied-embedding exchange);
7. the update: :class:`PlainStep` (DDP over dp when dp > 1, AdamW on ``.grad``) at
   ``zero.stage = 0``, else :class:`ZeroStep` (a ZeroOptimizer over dp, its fp16 loss scale
   agreed over dp, tp and pp, stage 3's root gathered around the model's ends).

The trainer, the benchmarks and the tests build a rank through this function, so what
they run is what ``loom train`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.config import BatchShape, Config
from loom.distributed.context import DistContext
from loom.model.recompute import Recompute
from loom.model.transformer import Transformer
from loom.optim.adamw import build_adamw
from loom.optim.onebit import OneBitAdam
from loom.optim.scaler import DynamicLossScaler
from loom.optim.zero_one import ZeroOneAdam
from loom.parallel.ddp import DataParallel
from loom.parallel.grad_fusion import GradFusion
from loom.parallel.memory import ActivationMeter
from loom.parallel.pipeline.partition import StagePlan, rank_stages
from loom.parallel.pipeline.rank import PipelineRank
from loom.parallel.random import ParallelRNG
from loom.parallel.tensor import TensorParallel
from loom.parallel.weight_grad import WeightGradStore
from loom.parallel.zero.onebit import ZeroOneBit
from loom.parallel.zero.optimizer import ZeroOptimizer
from loom.plan.rank_memory import choose_recompute_layers, predict_rank_memory
from loom.train.plain_step import PlainStep
from loom.train.precision import Precision
from loom.train.zero_step import ZeroStep


@dataclass
class Rank:
    """This rank's parts (see the module docstring for how each is decided)."""

    batch: BatchShape
    plans: list[StagePlan]
    tp: TensorParallel
    rng: ParallelRNG
    model: Transformer
    pipeline: PipelineRank | None
    update: PlainStep | ZeroStep
    meter: ActivationMeter  # activation bytes saved for backward, per micro-batch and step
    recompute_note: str | None  # why ``recompute_layers = "auto"`` chose what it did


def build_rank(config: Config, dist: DistContext, precision: Precision) -> Rank:
    """Build this rank's parts from ``config`` (``config.model.vocab_size`` already set)."""
    coords, pp = dist.coords, dist.comm("pp")
    batch = config.batch(dp=dist.dims.dp)
    plans = rank_stages(config.model.n_layers, pp.size, config.parallel.vp, coords.pp)
    pipelined = len(plans) > 1 or pp.size > 1
    weight_grads = WeightGradStore() if pipelined and config.parallel.schedule == "zero_bubble" else None
    tp = TensorParallel(dist.comm("tp"), config.parallel.sequence_parallel, weight_grads)
    rng = ParallelRNG(dist.device, dp_rank=coords.dp, tp_rank=coords.tp)
    recompute, recompute_note = recompute_of(config, dist.dims.dp, coords.pp, dist.device)
    model = Transformer(
        config.model,
        seed=config.train.seed,
        device=dist.device,
        tp=tp,
        rng=rng,
        layers=sorted(i for plan in plans for i in plan.layers),
        embed=any(p.embed for p in plans),
        head=any(p.head for p in plans),
        recompute=recompute,
        meta=config.zero.stage == 3,  # ZeRO-3 materialises one unit at a time, keeping its shard
    )
    meter = ActivationMeter()
    pipeline = None
    if pipelined:
        seq = config.train.seq_len // (tp.size if tp.sequence_parallel else 1)
        shape = (batch.micro_batch, seq, config.model.d_model)
        pipeline = PipelineRank(
            model,
            plans,
            pp,
            config.parallel.schedule,
            batch.grad_accum,
            shape,
            dist.device,
            precision.autocast,
            model.placements,
            weight_grads,
            meter,
        )
    update = (
        _zero_step(config, dist, model, tp, pipeline)
        if config.zero.stage
        else _plain_step(config, dist, model, tp, pipeline, precision)
    )
    return Rank(batch, plans, tp, rng, model, pipeline, update, meter, recompute_note)


def recompute_of(config: Config, dp: int, pp_rank: int, device: torch.device) -> tuple[Recompute, str | None]:
    """This rank's recomputation: ``train.recompute`` on ``train.recompute_layers`` blocks per
    chunk; for ``auto`` the fewest that fit ``train.memory_budget_gb`` by the planner's model
    (per stage: stage r of 1F1B holds p - r micro-batches), with a line saying why."""
    train = config.train
    if train.recompute_layers != "auto":
        return Recompute(train.recompute, train.recompute_layers), None
    budget = train.memory_budget_gb * 1e9
    count, predicted, fits = choose_recompute_layers(config, dp, pp_rank, budget, device.type)
    fewer = predict_rank_memory(config, dp, pp_rank, count - 1, device.type) if count else None
    why = (
        f"recompute_layers = auto on pp rank {pp_rank}: {count} block(s) per chunk ({train.recompute}), "
        f"predicted {predicted.total / 1e9:.3f} GB of the {train.memory_budget_gb:g} GB budget"
        + (f"; {count - 1} would need {fewer.total / 1e9:.3f} GB" if fewer is not None else "")
        + ("" if fits else "; it does not fit even so: lower the micro-batch, or shard more (ZeRO, tp, pp)")
    )
    return Recompute(train.recompute, count), why


def _plain_step(
    config: Config,
    dist: DistContext,
    model: Transformer,
    tp: TensorParallel,
    pipeline: PipelineRank | None,
    precision: Precision,
) -> PlainStep:
    ddp = None
    if dist.dims.dp > 1:
        # the norm is taken during the sync where this rank's .grad is the whole model, each
        # parameter once, and stays as synced (no tp shards, no stages, no fp16 unscale)
        whole = tp.size == 1 and pipeline is None and precision.name != "fp16"
        ddp = DataParallel(
            model,
            dist.comm("dp"),
            config.ddp.bucket_mb,
            measure_norm=whole,
            transport=config.ddp.transport,
            timeout_s=config.parallel.timeout_s,
        )
        if config.ddp.fuse_weight_grads:
            tp.grad_fusion = GradFusion(ddp)  # the model's own linear weights compute dW into their bucket slots
    optimizer = build_adamw(model, config.train, dist.device)
    if config.optim.name == "onebit_adam":  # AdamW's warm-up, then the momentum 1 bit a value over dp
        freeze, places = config.optim.freeze(config.train.steps), model.placements
        optimizer = OneBitAdam(optimizer, dist.comm("dp"), freeze, replica_class=lambda p: places.of(p).replica_class)
    elif config.optim.name == "zero_one_adam":  # variance steps, 1-bit momentum between, then local steps
        schedule, places = config.optim.zero_one_schedule(config.train.steps), model.placements
        optimizer = ZeroOneAdam(
            optimizer, dist.comm("dp"), schedule, replica_class=lambda p: places.of(p).replica_class
        )
    # fp16: one loss scale for the run, its overflow check agreed over dp, tp and pp
    scaler = DynamicLossScaler([dist.comm("dp"), tp.comm, dist.comm("pp")]) if precision.name == "fp16" else None
    return PlainStep(model, tp, dist.comm("pp"), pipeline, precision, optimizer, ddp, scaler)


def _zero_step(
    config: Config, dist: DistContext, model: Transformer, tp: TensorParallel, pipeline: PipelineRank | None
) -> ZeroStep:
    train, zero = config.train, config.zero
    dp, pp = dist.comm("dp"), dist.comm("pp")
    scaler = DynamicLossScaler([dp, tp.comm, pp]) if train.precision == "fp16" else None
    optimizer = ZeroOptimizer(
        model,
        dp,
        zero.stage,
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        eps=train.eps,
        weight_decay=train.weight_decay,
        param_dtype=train.precision,
        grad_dtype=zero.grad_dtype,
        offload=None if zero.offload == "none" else zero.offload,
        bucket_mb=config.ddp.bucket_mb,
        scaler=scaler,
        root_hooks=False,
        device=dist.device,
        initial=lambda name: model.initial_value(name, dist.device),
    )
    gatherer = optimizer.gatherer
    if gatherer is not None and gatherer.root is not None:
        # the embeddings, final norm and head (what no block owns) are gathered around each use,
        # in forward and in every pipeline chunk that embeds or applies the head
        root = gatherer.root
        model.register_ends_hook(lambda: gatherer.enter(root), lambda out: gatherer.leave(root, out))
    if pipeline is not None:
        pipeline.use_activation_dtype(optimizer.param_dtype)
    hyper = {"lr": train.lr, "betas": (train.beta1, train.beta2), "eps": train.eps, "weight_decay": train.weight_decay}
    onebit = None
    if config.optim.name == "onebit_adam":  # ZeRO's AdamW for the warm-up, then the momentum 1 bit a value
        places = model.placements
        onebit = ZeroOneBit(
            optimizer.update, dp, config.optim.freeze(train.steps), lambda p: places.of(p).replica_class
        )
    return ZeroStep(model, tp, pp, pipeline, optimizer, hyper, onebit)
