"""Bytes each rank sends per optimizer step, per group, and their time on the links.

Counted as loom's ledger counts (``loom.distributed.ledger``): a ring all-reduce of S bytes
sends 2(n-1)/n S, a reduce-scatter or all-gather (n-1)/n S, a point-to-point message S.
E = b s h elements is one micro-batch's activation (whole sequence), c the compute dtype's
bytes, r the residual stream's (the parameters' dtype), per transformer layer and micro-batch:

- tp without sp: the two region exits all-reduce forward (c), the two entries all-reduce the
  input gradient backward (r): 2(t-1)/t E (2c + 2r);
- tp with sp: exits reduce-scatter forward (c) and all-gather backward (c); entries all-gather
  forward (c), reduce-scatter backward (r) and all-gather their saved slice again (c):
  (t-1)/t E (8c + 2r);
- full recomputation runs the forward collectives of each recomputed layer again;
- plus the embedding's exit (its fp32 output) and the head's entry;
- dp: ZeRO's 2Ψ or 3Ψ (``loom.plan.memory.dp_bytes_per_step``; stage 3 gathers the parameters
  twice more per extra micro-batch), DDP's 2(n-1)/n (Ψ + 1 loss element) of the gradients;
- pp: per micro-batch and chunk, the activation sent forward and its gradient back (b s/d h in
  the pipeline's dtype), and once per step the tied embedding's gradient between the ends.

Time under the alpha-beta model: messages x alpha + bytes / beta of the link the group spans
(tp is innermost in loom's mesh, then dp, then pp: a group crosses nodes when its stride times
its size exceeds the devices of a node), a collective of n ranks taking 2(n-1) messages. tp
makes 4 collectives per layer and micro-batch plus the embedding's and the head's; sp turns
each into two (an all-gather and a reduce-scatter) and adds the 2L + 1 gathers of the saved
slices again, 10L + 5 in all.

On a CPU host with more processes than cores, a rank that blocks on a collective gives its core
to another, and the collective completes only once each of its peers has had a core again: every
collective and transfer also waits for its peers' turns (``Hardware.turn_wait``). A pipeline's
stages wait on one another; groups beside each other (dp replicas, tp groups) might fill each
other's waits, but they run collectives as often as they compute (tp + sp: 10L + 5 a micro-batch),
so they wait too: measured on dp 2 x tp 2 with sp, 4 processes on 2 cores, the step ran 14-32%
past a prediction that let them fill each other's waits, in each of four runs
(``bench/plan_accuracy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.plan.hardware import Hardware
from loom.plan.memory import dp_bytes_per_step


@dataclass(frozen=True)
class CommShape:
    """What the byte counts need to know of a layout and its model."""

    layers_per_rank: int
    hidden: int
    vocab: int
    seq: int
    micro_batch: int
    microbatches: int  # per step and dp rank
    dp: int
    tp: int
    pp: int
    vp: int
    sp: bool
    zero_stage: int
    params_per_rank: int  # Ψ over tp and pp
    compute_bytes: int
    residual_bytes: int  # the parameters' dtype
    grad_bytes: int
    pipeline_bytes: int  # what crosses pipeline stages
    recompute: str
    recomputed_layers: int  # per rank
    tied: bool
    pp_rank: int | None = None  # a given pipeline rank's traffic; None: the average rank's


def tp_bytes(shape: CommShape) -> float:
    t = shape.tp
    if t == 1:
        return 0.0
    e = shape.micro_batch * shape.seq * shape.hidden
    c, r = shape.compute_bytes, shape.residual_bytes
    ring = (t - 1) / t
    # the embedding's exit carries its fp32 output (all-reduce; sp: reduce-scatter, all-gather back)
    embed = 2 * ring * e * r
    if shape.sp:
        layer, forward = ring * e * (8 * c + 2 * r), ring * e * 4 * c
        head = ring * e * (2 * c + r)  # the head's entry: all-gather, reduce-scatter back, re-gather
    else:
        layer, forward = 2 * ring * e * (2 * c + 2 * r), 2 * ring * e * 2 * c
        head = 2 * ring * e * r  # the head's entry: the input gradient all-reduced
    recomputed = shape.recomputed_layers * forward if shape.recompute == "full" else 0.0
    # only the chunks holding an end have it: the embedding on pp rank 0, the head on the last
    if shape.pp == 1:
        end_share = embed + head
    elif shape.pp_rank is None:
        end_share = (embed + head) / shape.pp
    else:
        end_share = embed * (shape.pp_rank == 0) + head * (shape.pp_rank == shape.pp - 1)
    return shape.microbatches * (shape.layers_per_rank * layer + recomputed + end_share)


def dp_bytes(shape: CommShape) -> float:
    n, psi = shape.dp, shape.params_per_rank
    if n == 1:
        return 0.0
    ring = (n - 1) / n
    if shape.zero_stage == 0:
        return 2 * ring * (psi * shape.grad_bytes + 4)
    total = dp_bytes_per_step(shape.zero_stage, psi, n, shape.residual_bytes, shape.grad_bytes)
    if shape.zero_stage == 3:
        total += 2 * ring * psi * shape.residual_bytes * (shape.microbatches - 1)
    return total


def onebit_dp_bytes(params: int, dp: int, publish_bytes: int = 0) -> float:
    """dp bytes of one 1-bit Adam step after its warm-up (loom.distributed.compressed): the
    momenta of ``params`` values, padded to dp chunks of a multiple of 8, go through an all-to-all
    and an all-gather of packed signs ((n-1)/n of P/8 bytes each) and of one fp32 scale per chunk
    ((n-1) x 4 bytes each), and the loss with the gradient-norm square rides in one 2-float
    all-reduce. During the warm-up the step's bytes are DDP's or ZeRO's (:func:`dp_bytes`).

    ``publish_bytes``: ZeRO-1/2 with 16-bit parameters (or offload), where only the owner holds
    the fp32 master, adds ZeRO's all-gather of the updated parameters, (n-1)/n x params x that
    many bytes (loom.parallel.zero.onebit); fp32 parameters are updated alike on every rank and
    add nothing. ZeRO's first compressed step also all-gathers 1/D and m/D once (2 (n-1)/n x 4
    bytes a value), which the median over the run's steps leaves out."""
    if dp == 1:
        return 0.0
    chunk = 8 * -(-params // (8 * dp))
    ring = (dp - 1) / dp
    return 2 * ring * chunk * dp / 8 + 2 * (dp - 1) * 4 + metrics_dp_bytes(dp) + ring * params * publish_bytes


def metrics_dp_bytes(dp: int) -> float:
    """dp bytes of a step that sends no gradients (0/1 Adam's local step): the loss and the
    gradient-norm square in one 2-float ring all-reduce, 2 (n-1)/n x 8 bytes."""
    return 2 * (dp - 1) / dp * 8 if dp > 1 else 0.0


def pp_bytes(shape: CommShape) -> float:
    if shape.pp == 1:
        return 0.0
    d = shape.tp if shape.sp else 1
    message = shape.micro_batch * shape.seq // d * shape.hidden * shape.pipeline_bytes
    stages = shape.pp * shape.vp
    tied_grad = shape.vocab * shape.hidden * 4 / shape.tp if shape.tied else 0.0  # fp32 gradient, once a step
    if shape.pp_rank is None:  # every chunk but the last stage's sends forward, every one but the first backward
        return shape.microbatches * 2 * (stages - 1) / shape.pp * message + 2 * tied_grad / shape.pp
    mine = [c * shape.pp + shape.pp_rank for c in range(shape.vp)]
    boundaries = sum((s < stages - 1) + (s > 0) for s in mine)
    ends = tied_grad * (shape.pp_rank in (0, shape.pp - 1))
    return shape.microbatches * boundaries * message + ends


def tp_collectives(shape: CommShape) -> int:
    """Collectives of the tp group per micro-batch (module docstring): 4L + 2, with sp 10L + 5."""
    layers = shape.layers_per_rank
    return 10 * layers + 5 if shape.sp else 4 * layers + 2


def crosses_nodes(stride: int, size: int, hardware: Hardware) -> bool:
    return stride * size > hardware.devices_per_node


def transfers(shape: CommShape) -> dict[str, int]:
    """Blocking collectives and point-to-point transfers per step and group (0 for a group of one):
    tp's :func:`tp_collectives` per micro-batch; dp's gradient (or ZeRO's scatter and gather) and
    the loss, plus ZeRO-3's gathers per extra micro-batch; pp's activation and gradient per
    micro-batch and chunk."""
    counts = {
        "tp": shape.microbatches * tp_collectives(shape),
        "dp": 2 + shape.microbatches * (shape.zero_stage == 3),
        "pp": 2 * shape.microbatches * shape.vp,
    }
    sizes = {"tp": shape.tp, "dp": shape.dp, "pp": shape.pp}
    return {group: count if sizes[group] > 1 else 0 for group, count in counts.items()}


def comm_seconds(shape: CommShape, hardware: Hardware) -> dict[str, float]:
    """Seconds per step each group's traffic takes on its link (alpha-beta), not yet overlapped;
    on a host with more processes than cores, each collective and transfer also waits its
    peers' turns (``Hardware.turn_wait``; module docstring)."""
    out = {}
    counts = transfers(shape)
    turn = hardware.turn_wait()
    for group, nbytes, stride, size in (
        ("tp", tp_bytes(shape), 1, shape.tp),
        ("dp", dp_bytes(shape), shape.tp, shape.dp),
        ("pp", pp_bytes(shape), shape.tp * shape.dp, shape.pp),
    ):
        if size == 1:
            out[group] = 0.0
            continue
        inter = crosses_nodes(stride, size, hardware)
        beta = hardware.inter_bandwidth if inter else hardware.intra_bandwidth
        alpha = hardware.inter_latency if inter else hardware.intra_latency
        out[group] = counts[group] * (2 * (size - 1) * alpha + turn) + nbytes / beta
    return out
