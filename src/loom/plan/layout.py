"""A layout's predicted cost, and the search over layouts that ``loom plan`` runs.

For one layout (dp, tp, pp, vp, schedule, ZeRO stage, sp, recompute, micro-batch) of a model
on a device type, the prediction combines the planner's models:

- memory per device: the most loaded pipeline rank (the first holds the most micro-batches,
  the last the logits) by ``loom.plan.rank_memory``;
- communication per group: ``loom.plan.comm`` (bytes, then seconds on the link it spans);
- compute: hardware FLOPs (``loom.plan.flops``, recomputation included; dense causal attention's
  scores as far as its kernel computes them, :func:`loom.plan.activations.computed_fraction`,
  about half the square) per device over the device's peak times its achieved fraction
  (``Hardware.compute_efficiency``), plus the dropout masks it draws (:func:`dropout_draws`) at
  ``Hardware.dropout_rate``, and a fixed cost per block and micro-batch
  (``Hardware.layer_overhead_s``); on a CPU host, whose processes share its cores, over each
  process's threads (:func:`compute_seconds`);
- the pipeline bubble in closed form (``loom.parallel.pipeline.simulate.bubble_formula``), a
  split backward's from the forward, backward and weight-gradient times (:func:`pass_costs`);
- step time = compute x (1 + bubble) + tp + pp transfers (on the critical path) + what of the
  dp traffic backward cannot hide (dp is overlapped with the backward, 2/3 of the compute;
  ZeRO-3's gathers with the whole step; on a CPU host nothing, as the backend moves the bytes
  on the cores that compute). On a CPU host with more processes than cores the
  compute term is at least every process's compute over the cores: they take turns, and a
  stage waiting in the bubble gives its core to another.

MFU and HFU are model and hardware FLOPs per second over the devices' peak (the whole s x s
square for dense attention, as the papers count).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from loom.attention_walk import causal_run_scores, computed_density, layout_density
from loom.config import Config
from loom.parallel.pipeline.simulate import Costs, bubble_formula
from loom.plan.activations import attention_kernel, computed_fraction
from loom.plan.comm import (
    CommShape,
    comm_seconds,
    dp_bytes,
    metrics_dp_bytes,
    onebit_dp_bytes,
    pp_bytes,
    tp_bytes,
    transfers,
)
from loom.plan.flops import GPTShape, executed_flops, hardware_flops, model_flops
from loom.plan.hardware import Hardware
from loom.plan.model import count_rank_parameters
from loom.plan.rank_memory import (
    BYTES,
    RankMemory,
    inflight,
    predict_rank_memory,
    recomputed_blocks,
    recomputed_layer_bytes,
)

MICRO_BATCHES = (1, 2, 4, 8, 16)
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    vp: int
    schedule: str
    zero: int
    sp: bool
    recompute: str
    micro_batch: int

    def describe(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}" + ("+sp" if self.sp else ""), f"pp{self.pp}"]
        if self.pp > 1:
            parts.append(self.schedule + (f" vp{self.vp}" if self.vp > 1 else ""))
        parts += [f"zero{self.zero}", f"recompute {self.recompute}", f"micro-batch {self.micro_batch}"]
        return ", ".join(parts)


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    memory: RankMemory  # the most loaded rank
    comm_bytes: dict[str, float]
    comm_s: dict[str, float]
    bubble: float
    compute_s: float  # one device's compute per step (FLOPs, recomputation's rewrites, dropout draws), no waiting
    step_s: float
    mfu: float
    hfu: float
    fits: bool
    dropout_s: float = 0.0  # of compute_s, drawing dropout masks
    rewrite_bytes: float = 0.0  # activations recomputation writes again per step (``Hardware.rewrite_bandwidth``)
    critical_s: float = 0.0  # compute's share of the step: compute_s x (1 + bubble), or the cores' turns
    transfers: int = 0  # blocking collectives and point-to-point transfers per step (``loom.plan.comm.transfers``)
    passes: Costs | None = None  # with pp > 1: one device's F, B and W seconds per step (:func:`pass_costs`)
    overhead_s: float = 0.0  # of compute_s, the blocks' fixed cost per micro-batch (``Hardware.layer_overhead_s``)
    overhead_units: float = 0.0  # blocks x micro-batches one device runs per step

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["memory"] = {**dataclasses.asdict(self.memory), "total": self.memory.total}
        out["layout"]["describe"] = self.layout.describe()
        return out


def config_for(base: Config, layout: Layout, global_batch: int) -> Config:
    """``base`` with ``layout`` applied (not validated: :func:`layouts` only yields valid ones)."""
    return dataclasses.replace(
        base,
        train=dataclasses.replace(
            base.train,
            micro_batch=layout.micro_batch,
            global_batch=global_batch,
            grad_accum=None,
            microbatches=None,
            recompute=layout.recompute,
            # a run's own count of recomputed blocks is kept; the search recomputes every block
            recompute_layers=base.train.recompute_layers
            if layout.recompute == base.train.recompute and isinstance(base.train.recompute_layers, int)
            else None,
        ),
        parallel=dataclasses.replace(
            base.parallel,
            dp=layout.dp,
            tp=layout.tp,
            pp=layout.pp,
            vp=layout.vp,
            schedule=layout.schedule if layout.pp > 1 else "1f1b",
            sequence_parallel=layout.sp,
        ),
        zero=dataclasses.replace(base.zero, stage=layout.zero, offload="none", grad_dtype=None),
    )


def predict(
    base: Config,
    layout: Layout,
    hardware: Hardware,
    global_batch: int,
    device: str = "cuda",
    pp_rank: int | None = None,
) -> Prediction:
    """The predicted memory, traffic and step time of ``layout`` (module docstring); memory and
    traffic of pipeline rank ``pp_rank`` (None: the most loaded rank's memory, the average traffic)."""
    config = config_for(base, layout, global_batch)
    model, precision = config.model, config.train.precision
    m = global_batch // (layout.dp * layout.micro_batch)
    ranks = {0, layout.pp - 1} if pp_rank is None else {pp_rank}
    memories = [
        predict_rank_memory(config, layout.dp, r, None, device, inflight(layout.schedule, layout.pp, m, layout.vp, r))
        for r in ranks
    ]
    memory = max(memories, key=lambda mem: mem.total)
    per_rank = count_rank_parameters(model, layout.tp, layout.pp, layout.vp, pp_rank or 0)
    compute = BYTES[precision]
    residual = compute if layout.zero else 4
    # blocks recomputed per micro-batch: on this rank (rank 0's draws and rewrites when averaged)
    # and over the whole model (the FLOPs, spread over the devices)
    recomputed = recomputed_blocks(config, pp_rank or 0)
    recomputed_total = sum(recomputed_blocks(config, r) for r in range(layout.pp))
    shape = CommShape(
        layers_per_rank=model.n_layers // layout.pp,
        hidden=model.d_model,
        vocab=model.vocab_size or 0,
        seq=config.train.seq_len,
        micro_batch=layout.micro_batch,
        microbatches=m,
        dp=layout.dp,
        tp=layout.tp,
        pp=layout.pp,
        vp=layout.vp,
        sp=layout.sp,
        zero_stage=layout.zero,
        params_per_rank=per_rank,
        compute_bytes=compute,
        residual_bytes=residual,
        grad_bytes=residual,
        pipeline_bytes=residual,
        recompute=layout.recompute,
        recomputed_layers=recomputed,
        tied=model.tied and layout.pp > 1,
        pp_rank=pp_rank,
    )
    comm_bytes = {"dp": dp_bytes(shape), "tp": tp_bytes(shape), "pp": pp_bytes(shape)}
    if config.optim.name == "onebit_adam":  # after the warm-up (whose steps are DDP's, "dp")
        owner_only = layout.zero in (1, 2) and (precision != "fp32" or config.zero.offload != "none")
        publish = compute if owner_only else 0  # ZeRO's all-gather of the owners' updated parameters
        comm_bytes["dp_compressed"] = onebit_dp_bytes(per_rank, layout.dp, publish)
    if config.optim.name == "zero_one_adam":  # between variance steps ("dp"), and its local steps
        comm_bytes["dp_compressed"] = onebit_dp_bytes(per_rank, layout.dp)
        comm_bytes["dp_local"] = metrics_dp_bytes(layout.dp)
    seconds = comm_seconds(shape, hardware)
    sparse = model.attention == "sparse"
    density = layout_density(model.sparse_attention, model.n_heads, config.train.seq_len) if sparse else 1.0
    gpt = GPTShape(model.n_layers, model.d_model, model.vocab_size or 0, config.train.seq_len, density)
    world = layout.dp * layout.tp * layout.pp
    model_total = model_flops(gpt, global_batch)  # MFU and HFU: the whole square for dense attention
    hardware_total = hardware_flops(gpt, global_batch, layout.recompute, recomputed_total)
    # the step time: what the kernels compute (a causal kernel about half of the square)
    kernel = attention_kernel(device, model.dropout, model.attention, model.sparse_attention.kernel)
    computed = (  # what the kernel computes, for the step time: a causal kernel's tiles, a sparse one's slots
        computed_density(model.sparse_attention, model.n_heads, config.train.seq_len, device)
        if sparse
        else computed_fraction(kernel, device, gpt.seq)
    )
    ran = dataclasses.replace(gpt, attention_density=computed)
    ran_model, ran_hardware = (
        model_flops(ran, global_batch),
        executed_flops(ran, global_batch, layout.recompute, kernel, recomputed_total),
    )
    draws = dropout_draws(config, layout, m, recomputed)
    dropout_s = draws / hardware.dropout_rate if hardware.dropout_rate else 0.0
    rewrite = m * recomputed * recomputed_layer_bytes(config, device)
    units = m * model.n_layers / layout.pp  # each micro-batch through each of the device's blocks
    overhead = units * hardware.layer_overhead_s
    processes = min(world, hardware.devices_per_node)
    bubble, passes = 0.0, None
    if layout.pp > 1:
        rate = achieved_rate(hardware, precision, processes)
        one_thread = hardware.peak_flops(precision) * hardware.compute_efficiency  # rewrites speed up as FLOPs do
        rewrite_flops = rewrite / hardware.rewrite_bandwidth * one_thread if hardware.rewrite_bandwidth else 0.0
        first = dropout_draws(config, dataclasses.replace(layout, recompute="none"), m, 0)
        first_s = first / hardware.dropout_rate if hardware.dropout_rate else 0.0
        forward, backward = ran_model / 3 / world, (ran_hardware - ran_model / 3) / world + rewrite_flops
        passes = pass_costs(ran, forward, backward, rate, dropout_s, first_s, hardware.weight_pass_speedup, overhead)
        formula = bubble_formula(layout.schedule, layout.pp, m, layout.vp, passes)
        bubble = formula[1] if formula else (layout.pp - 1) / m
    compute_s, critical_s = compute_seconds(
        hardware, precision, ran_hardware / world, dropout_s, processes, bubble, rewrite, overhead
    )
    # overlapped dp traffic hides behind the backward, unless the backend's threads copy it on the
    # very cores that compute (a CPU host)
    hidden = 0.0 if hardware.cores else compute_s if layout.zero == 3 else 2 / 3 * compute_s
    step_s = critical_s + seconds["tp"] + seconds["pp"] + max(0.0, seconds["dp"] - hidden)
    peak = hardware.peak_flops(precision) * world
    return Prediction(
        layout,
        memory,
        comm_bytes,
        seconds,
        bubble,
        compute_s,
        step_s,
        model_total / step_s / peak,
        hardware_total / step_s / peak,
        memory.total <= hardware.memory_bytes,
        dropout_s=dropout_s,
        rewrite_bytes=rewrite,
        critical_s=critical_s,
        transfers=sum(transfers(shape).values()),
        passes=passes,
        overhead_s=overhead,
        overhead_units=units,
    )


def pass_costs(
    shape: GPTShape,
    forward_flops: float,
    backward_flops: float,
    rate: float,
    dropout_s: float,
    first_s: float,
    weight_speedup: float = 1.0,
    overhead_s: float = 0.0,
) -> Costs:
    """Seconds of one device's forward F, backward B and weight gradients W per step, for the
    bubble of a split-backward schedule (zero-bubble's, Qi et al. 2023: (p-1)(F + B - 2W) /
    (m(F + B))): F its forward FLOPs at ``rate`` and the ``first_s`` of dropout drawn then; B its
    backward FLOPs (the recomputed forward and its rewrites included) and the rest of the draws;
    W the weight gradients, as many FLOPs as the forward's matmuls with weights (all but the
    attention core's), so W < B / 2 where the core, recomputation or dropout weigh. W's FLOPs run
    at ``weight_speedup`` x ``rate`` (``Hardware.weight_pass_speedup``: matmuls alone, none of the
    elementwise work the rate spreads over every FLOP), at most B. The blocks' fixed cost per
    micro-batch (``overhead_s``) goes a third to F, two thirds to B, as the FLOPs do.
    """
    s, n, h, v = shape.seq, shape.layers, shape.hidden, shape.vocab
    weighted = n * 24 * s * h * h + 2 * s * h * v  # per sequence; the core adds n 4 rho s^2 h
    share = weighted / max(weighted + n * 4 * shape.attention_density * s * s * h, 1)
    f = forward_flops / rate + first_s + overhead_s / 3
    b = backward_flops / rate + dropout_s - first_s + 2 * overhead_s / 3
    return Costs(forward=f, backward=b, weight=min(share * forward_flops / (rate * weight_speedup), b))


def achieved_rate(hardware: Hardware, precision: str, processes: int) -> float:
    """FLOP/s one device achieves: peak x efficiency, on a CPU host times its threads' speed-up."""
    return hardware.peak_flops(precision) * hardware.compute_efficiency * hardware.speedup(processes)


def compute_seconds(
    hardware: Hardware,
    precision: str,
    flops: float,
    dropout_s: float,
    processes: int,
    bubble: float,
    rewrite_bytes: float = 0.0,
    overhead_s: float = 0.0,
) -> tuple[float, float]:
    """(compute, critical): one device's compute per step, ``flops`` at the achieved rate, the
    ``rewrite_bytes`` recomputation writes again at ``Hardware.rewrite_bandwidth``, plus
    ``dropout_s`` and the blocks' fixed cost per micro-batch ``overhead_s`` (no faster with more
    threads); and the compute's share of the step, compute x (1 + bubble).

    On a CPU host (``Hardware.cores``) each of the node's ``processes`` computes with
    k = cores / processes threads at 1 + (k - 1) e times one thread's rate (the masks are drawn
    by one thread); with more processes than cores they take turns, so the step's compute is
    at least processes x compute / cores, whatever the bubble (an idle stage's core serves another).
    """
    rewrite = rewrite_bytes / hardware.rewrite_bandwidth if hardware.rewrite_bandwidth else 0.0
    compute = flops / achieved_rate(hardware, precision, processes) + rewrite / hardware.speedup(processes)
    compute += dropout_s + overhead_s
    critical = compute * (1 + bubble)
    if hardware.cores and processes > hardware.cores:
        critical = max(critical, compute * processes / hardware.cores)
    return compute, critical


def dropout_draws(config: Config, layout: Layout, microbatches: int, recomputed: int | None = None) -> float:
    """Dropout mask elements one device draws per step (pipeline stage 0, the embedding's included).

    Per micro-batch and layer: the two residual dropouts, b s h each (b s/t h under sequence
    parallelism, else every tp rank draws the whole mask), and on dense attention the attention
    probabilities', b (a/t) per head's :func:`loom.attention_walk.causal_run_scores` (loom's dropout core
    draws over the causal triangle's row runs, about s^2 / 2; the other attention kinds drop no
    probabilities). Recomputation draws again: all of a layer's for
    ``full``, the probabilities' for ``selective``, on the ``recomputed`` blocks of the stage (None:
    every block). The embedding's dropout draws b s h (/t).
    """
    model, train = config.model, config.train
    if not model.dropout:
        return 0.0
    b, s, h = layout.micro_batch, train.seq_len, model.d_model
    tokens = b * s / (layout.tp if layout.sp else 1)
    probs = b * (model.n_heads / layout.tp) * causal_run_scores(s) if model.attention == "dense" else 0.0
    layer = 2 * tokens * h + probs
    again = {"none": 0.0, "full": layer, "selective": probs}[layout.recompute]
    layers = model.n_layers // layout.pp
    recomputed = layers if recomputed is None else recomputed
    return microbatches * (layers * layer + recomputed * again + tokens * h)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(base: Config, world: int, global_batch: int, hardware: Hardware) -> list[Layout]:
    """Every layout of ``world`` devices that validation would accept for this model and batch."""
    model, seq = base.model, base.train.seq_len
    out = []
    for tp in _divisors(world):
        if tp > hardware.devices_per_node or model.n_heads % tp or model.ffn_dim % tp:
            continue
        if model.kv_heads % tp and tp % model.kv_heads:
            continue
        for pp in _divisors(world // tp):
            if model.n_layers % pp:
                continue
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            for micro in MICRO_BATCHES:
                if (global_batch // dp) % micro:
                    continue
                m = global_batch // (dp * micro)
                schedules = [("1f1b", 1)]
                if pp > 1:
                    schedules.append(("zero_bubble", 1))
                    if model.n_layers % (2 * pp) == 0 and m % pp == 0:
                        schedules.append(("interleaved_1f1b", 2))
                for schedule, vp in schedules:
                    for sp in (False, True) if tp > 1 and seq % tp == 0 else (False,):
                        for zero in (0, 1, 2, 3):
                            if zero == 3 and schedule == "zero_bubble":
                                continue
                            for recompute in RECOMPUTE:
                                out.append(Layout(dp, tp, pp, vp, schedule, zero, sp, recompute, micro))
    return out


def plan(base: Config, world: int, global_batch: int, hardware: Hardware, device: str = "cuda") -> list[Prediction]:
    """Every valid layout's prediction, those that fit first, then by predicted step time."""
    predictions = [
        predict(base, layout, hardware, global_batch, device) for layout in layouts(base, world, global_batch, hardware)
    ]
    return sorted(predictions, key=lambda p: (not p.fits, p.step_s if p.fits else p.memory.total))
