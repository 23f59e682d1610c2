"""The planner's answers as text and records: the ranked layouts, one layout in detail, and a
run's prediction beside what it measured (``summary.json`` and ``loom plan --run``).

A run's measured figures come from its ``metrics.jsonl`` (rank 0's records): the median over
the steps after the first (which pays for warm-up) of its step time, bytes per group, memory
categories and measured bubble.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path

from loom.config import Config
from loom.parallel.pipeline.simulate import TIMELINE_FILE, load_measured
from loom.plan.hardware import Hardware
from loom.plan.layout import Layout, Prediction, predict

GIB = 2**30
CATEGORIES = ("params", "grads", "optim", "activations", "weight_copies")
MEASURED_KEYS = {
    "params": "mem_params_bytes",
    "grads": "mem_grads_bytes",
    "optim": "mem_optim_bytes",
    "activations": "mem_activation_bytes",
    "weight_copies": "mem_weight_copy_bytes",
}


def run_layout(config: Config, world: int) -> Layout:
    """The layout a run's config and world size describe."""
    parallel = config.parallel
    dp = world // (parallel.tp * parallel.pp)
    batch = config.batch(dp=dp)
    return Layout(
        dp,
        parallel.tp,
        parallel.pp,
        parallel.vp,
        parallel.schedule,
        config.zero.stage,
        parallel.sequence_parallel and parallel.tp > 1,
        config.train.recompute,
        batch.micro_batch,
    )


def predict_run(config: Config, world: int, hardware: Hardware, device: str, pp_rank: int | None = 0) -> Prediction:
    """The prediction for a run's own layout, for pipeline rank ``pp_rank`` (0: the rank whose
    records ``metrics.jsonl`` holds)."""
    layout = run_layout(config, world)
    return predict(config, layout, hardware, config.batch(dp=layout.dp).global_batch, device, pp_rank)


# dp while gradients are averaged in full, dp of a 1-bit step, dp of a 0/1 Adam local step, tp, pp
COMM_GROUPS = ("dp", "dp_compressed", "dp_local", "tp", "pp")
PHASE_GROUPS = {"full": "dp", "compressed": "dp_compressed", "sync": "dp_compressed", "local": "dp_local"}


def measured(records: Sequence[dict], tokens_per_step: int, freeze_step: int | None = None) -> dict:
    """Medians over a run's steps after the first (the first pays for warm-up), leaving out steps run
    under the profiler (``"profiled"``: it slows them) where others remain. A compressing
    optimizer's records say what each step sent (``dp_phase``): "dp" is then the median of the steps
    that averaged gradients in full, "dp_compressed" of the 1-bit ones, "dp_local" of 0/1 Adam's
    local steps. ``freeze_step`` splits 1-bit Adam records written without ``dp_phase``. The step
    time is the records' ``step_s`` (``train_step`` alone, what the planner predicts; records
    written before it existed: tokens per step over their ``tokens_per_s``)."""
    steps = [r for r in records if "loss" in r][1:] or [r for r in records if "loss" in r]
    steps = [r for r in steps if not r.get("profiled")] or steps
    if not steps:
        return {}
    by_phase: dict[str, list[float]] = {}
    for r in steps:
        phase = r.get("dp_phase")
        if phase is None and freeze_step is not None:
            phase = "compressed" if r["step"] > freeze_step else "full"
        if phase in PHASE_GROUPS:
            by_phase.setdefault(PHASE_GROUPS[phase], []).append(r["comm_bytes_dp"])

    def median(key: str) -> float | None:
        values = [r[key] for r in steps if r.get(key) is not None]
        return statistics.median(values) if values else None

    out = {
        "step_s": statistics.median(r.get("step_s") or tokens_per_step / r["tokens_per_s"] for r in steps),
        "memory": {name: median(key) for name, key in MEASURED_KEYS.items()},
        "comm_bytes": {g: median(f"comm_bytes_{g}") for g in ("dp", "tp", "pp")},
        "bubble": median("bubble_measured"),
        "peak_host_bytes": max((r.get("mem_peak_host_bytes") or 0) for r in steps) or None,
    }
    for group, values in by_phase.items():
        out["comm_bytes"][group] = statistics.median(values)
    return out


def side_by_side(prediction: Prediction, measured_: dict) -> dict:
    """``{"predicted": ..., "measured": ...}`` with the same categories, for ``summary.json``."""
    memory = dataclasses.asdict(prediction.memory)
    memory["optim"] += memory.pop("host_optim")  # a run reports its optimizer state wherever it lives
    return {
        "layout": prediction.layout.describe(),
        "predicted": {
            "memory": {k: memory[k] for k in CATEGORIES},
            "comm_bytes": prediction.comm_bytes,
            "bubble": prediction.bubble,
            "step_s": prediction.step_s,
        },
        "measured": measured_,
    }


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def format_ranking(predictions: Sequence[Prediction], top: int, hardware: Hardware, world: int) -> str:
    fitting = [p for p in predictions if p.fits]
    lines = [
        f"{len(predictions)} valid layouts of {world} x {hardware.name}; {len(fitting)} fit in "
        f"{hardware.memory_bytes / GIB:.0f} GiB per device. Best {min(top, len(fitting))} by predicted step time:",
        f"{'#':>3} {'step s':>8} {'MFU':>6} {'mem GiB':>8} {'params':>7} {'grads':>6} {'optim':>6} {'acts':>6} "
        f"{'bubble':>7}  layout",
    ]
    for i, p in enumerate(fitting[:top], 1):
        m = p.memory
        lines.append(
            f"{i:>3} {p.step_s:>8.3f} {100 * p.mfu:>5.1f}% {m.total / GIB:>8.1f} {m.params / GIB:>7.1f} "
            f"{m.grads / GIB:>6.1f} {m.optim / GIB:>6.1f} {(m.activations + m.weight_copies) / GIB:>6.1f} "
            f"{p.bubble:>7.3f}  {p.layout.describe()}"
        )
    return "\n".join(lines)


def format_nowhere(predictions: Sequence[Prediction], hardware: Hardware, world: int) -> str:
    smallest = min(predictions, key=lambda p: p.memory.total)
    need = smallest.memory.total
    return (
        f"no layout of {world} x {hardware.name} fits: the smallest needs {need / GIB:.1f} GiB per device "
        f"({smallest.layout.describe()}), the device has {hardware.memory_bytes / GIB:.0f} GiB. Use about "
        f"{world * need / hardware.memory_bytes:.0f} or more devices, a device with more memory, a shorter "
        "sequence or a smaller global batch."
    )


def format_explain(p: Prediction, hardware: Hardware) -> str:
    m = p.memory
    rows = [
        f"layout: {p.layout.describe()} on {hardware.name}",
        "memory per device (most loaded pipeline rank), GiB:",
        f"  parameters {_gb(m.params)}, gradients {_gb(m.grads)}, optimizer {_gb(m.optim)}, "
        f"activations {_gb(m.activations)}, 16-bit weight copies {_gb(m.weight_copies)}; total {_gb(m.total)} "
        f"of {hardware.memory_bytes / GIB:.0f} ({'fits' if p.fits else 'does not fit'})",
        "communication per step and device: "
        + ", ".join(f"{g} {p.comm_bytes[g] / GIB:.3f} GiB in {p.comm_s[g] * 1e3:.1f} ms" for g in ("dp", "tp", "pp")),
        f"compute {p.compute_s:.3f} s at {hardware.compute_efficiency:.0%} of peak"
        + (f" ({p.dropout_s:.3f} s of it drawing dropout masks)" if p.dropout_s else "")
        + f"; bubble {p.bubble:.3f}",
        f"step {p.step_s:.3f} s = compute x (1 + bubble) + tp + pp + dp not hidden by backward; "
        f"MFU {100 * p.mfu:.1f}%, HFU {100 * p.hfu:.1f}%",
    ]
    return "\n".join(rows)


def format_comparison(compared: dict) -> str:
    pred, meas = compared["predicted"], compared["measured"]
    lines = [f"layout: {compared['layout']}", f"{'':<28} {'predicted':>12} {'measured':>12} {'ratio':>7}"]

    def row(label: str, a: float | None, b: float | None, scale: float = 1.0, unit: str = "") -> None:
        ratio = f"{b / a:.3f}" if a and b is not None else "-"
        fa = "-" if a is None else f"{a / scale:.4g}{unit}"
        fb = "-" if b is None else f"{b / scale:.4g}{unit}"
        lines.append(f"{label:<28} {fa:>12} {fb:>12} {ratio:>7}")

    for name in CATEGORIES:
        row(f"memory {name} MiB", pred["memory"][name], meas.get("memory", {}).get(name), 2**20)
    for group in (g for g in COMM_GROUPS if g in pred["comm_bytes"]):
        row(f"comm {group} MiB/step", pred["comm_bytes"][group], meas.get("comm_bytes", {}).get(group), 2**20)
    row("bubble", pred["bubble"], meas.get("bubble"))
    row("step s", pred["step_s"], meas.get("step_s"))
    return "\n".join(lines)


def calibrate(prediction: Prediction, measured_: dict, hardware: Hardware) -> Hardware:
    """``hardware`` with its compute efficiency fitted so the predicted step equals the measured
    one, given the predicted transfers, dropout draws and recomputation: this machine's achieved
    FLOP/s (fit it on a run without traffic or recomputation, then :func:`calibrate_links` on
    one with traffic, :func:`calibrate_rewrite` on one that recomputes)."""
    p = prediction
    flops_now = p.compute_s - p.dropout_s - _rewrite_s(p, hardware) - p.overhead_s
    flops_s = _measured_compute_s(p, measured_) - p.dropout_s - _rewrite_s(p, hardware) - p.overhead_s
    efficiency = hardware.compute_efficiency * flops_now / max(flops_s, 1e-9)
    name = hardware.name if hardware.name.endswith("-calibrated") else f"{hardware.name}-calibrated"
    return dataclasses.replace(hardware, name=name, compute_efficiency=efficiency)


def calibrate_overhead(first: tuple[Prediction, dict], second: tuple[Prediction, dict], hardware: Hardware) -> Hardware:
    """``hardware`` with its FLOP rate and its blocks' fixed cost per micro-batch
    (``Hardware.layer_overhead_s``) fitted together on two runs of the same threads that differ in
    micro-batches per step (one micro-batch of 8 against four of 2, say): each run's measured
    compute, less its dropout draws and rewrites, is k x its FLOP seconds at the current rate plus
    c x its blocks x micro-batches, two equations for the rate's correction k and c. Left as it is
    when the runs cannot tell the two apart (the same blocks x micro-batches per FLOP); c is at
    least 0 (the rate then fitted on ``first`` alone)."""
    rows = []
    for p, measured_ in (first, second):
        fixed = p.dropout_s + _rewrite_s(p, hardware)
        rows.append((p.compute_s - fixed - p.overhead_s, p.overhead_units, _measured_compute_s(p, measured_) - fixed))
    (a1, u1, y1), (a2, u2, y2) = rows
    det = a1 * u2 - a2 * u1
    if abs(det) <= 1e-6 * abs(a1 * u2) or not (a1 > 0 and a2 > 0):
        return hardware
    k, c = (y1 * u2 - y2 * u1) / det, (a1 * y2 - a2 * y1) / det
    if c < 0:
        c, k = 0.0, y1 / a1
    if k <= 0:
        return hardware
    return dataclasses.replace(hardware, compute_efficiency=hardware.compute_efficiency / k, layer_overhead_s=c)


def calibrate_threads(prediction: Prediction, measured_: dict, hardware: Hardware, threads: int) -> Hardware:
    """``hardware`` with its thread efficiency fitted on a run whose processes computed with
    ``threads`` > 1 threads each, its compute efficiency already fitted on a one-thread run."""
    if threads <= 1 or not hardware.cores:
        return hardware
    p = prediction
    one_thread = (p.compute_s - p.dropout_s - p.overhead_s) * hardware.thread_speedup(threads)
    speedup = one_thread / max(_measured_compute_s(p, measured_) - p.dropout_s - p.overhead_s, 1e-9)
    return dataclasses.replace(hardware, thread_efficiency=max(0.0, (speedup - 1) / (threads - 1)))


def calibrate_rewrite(prediction: Prediction, measured_: dict, hardware: Hardware) -> Hardware:
    """``hardware`` with its rewrite bandwidth fitted on a run that recomputes, its FLOP rate
    (and thread efficiency) already fitted: the time the step spends past the recomputed
    FLOPs, per byte of the activations written again (0, FLOPs only, if it spends none)."""
    p = prediction
    if not p.rewrite_bytes:
        return hardware
    rewrite = _measured_compute_s(p, measured_) - (p.compute_s - _rewrite_s(p, hardware))
    if rewrite <= 0:  # no slower than its FLOPs: count those only
        return dataclasses.replace(hardware, rewrite_bandwidth=0.0)
    return dataclasses.replace(hardware, rewrite_bandwidth=p.rewrite_bytes / (rewrite * _speedup(p, hardware)))


def _speedup(p: Prediction, hardware: Hardware) -> float:
    """How much faster than one thread each process of the prediction's layout computes."""
    return hardware.speedup(min(p.layout.dp * p.layout.tp * p.layout.pp, hardware.devices_per_node))


def _rewrite_s(p: Prediction, hardware: Hardware) -> float:
    """Of a prediction's compute, the seconds of writing recomputed activations again."""
    if not (p.rewrite_bytes and hardware.rewrite_bandwidth):
        return 0.0
    return p.rewrite_bytes / hardware.rewrite_bandwidth / _speedup(p, hardware)


def _measured_compute_s(p: Prediction, measured_: dict) -> float:
    """The seconds one device computed in a measured step, by the prediction's other terms:
    the step less its exposed transfers, less the bubble (the same share as predicted)."""
    exposed = p.step_s - p.critical_s
    return max(measured_["step_s"] - exposed, 1e-9) * p.compute_s / p.critical_s


def measured_passes(run_dir: Path) -> dict | None:
    """Seconds a pipeline run's split backward spent per pass in its measured last step
    (``pipeline_timeline.json``): ``{"forward", "input", "weight"}`` summed over the pp ranks past
    the first (the first stage sends no input gradient, so its W is its whole backward); None for a
    run without a timeline or without a split backward."""
    path = Path(run_dir) / TIMELINE_FILE
    if not path.is_file():
        return None
    totals = {"F": 0.0, "I": 0.0, "W": 0.0}
    for row in load_measured(run_dir).ranks[1:]:
        for span in row:
            if span.action.kind in totals:
                totals[span.action.kind] += span.end - span.start
    if not (totals["F"] and totals["I"] and totals["W"]):
        return None
    return {"forward": totals["F"], "input": totals["I"], "weight": totals["W"]}


def calibrate_weight_pass(prediction: Prediction, measured_: dict, hardware: Hardware) -> Hardware:
    """``hardware`` with its weight-pass speed-up fitted on a zero-bubble run, the rest already
    fitted: W's share of the compute, W / (F + B), the term the bubble (p-1)(F + B - 2W) / (m(F + B))
    turns on, made equal to the measured one (``measured_["passes"]``, from :func:`measured_passes`;
    B = I + W). F + B is the step's FLOPs at the calibrated rate, W the weight matmuls' at
    ``weight_pass_speedup`` times it (``loom.plan.layout.pass_costs``), so the speed-up scales by
    predicted over measured share. Left as it is for a run without a measured split backward."""
    passes, got = prediction.passes, measured_.get("passes")
    if passes is None or not passes.weight or not got:
        return hardware
    predicted = passes.weight / (passes.forward + passes.backward)
    seen = got["weight"] / (got["forward"] + got["input"] + got["weight"])
    return dataclasses.replace(hardware, weight_pass_speedup=hardware.weight_pass_speedup * predicted / seen)


def calibrate_links(prediction: Prediction, measured_: dict, hardware: Hardware) -> Hardware:
    """``hardware`` with its intra-node bandwidth fitted so that the predicted step of a run whose
    tp (or pp) traffic is on the critical path equals the measured one, the compute as predicted."""
    p = prediction
    exposed = measured_["step_s"] - p.critical_s
    nbytes = p.comm_bytes["tp"] + p.comm_bytes["pp"]
    if exposed <= 0 or not nbytes:
        return hardware
    return dataclasses.replace(hardware, intra_bandwidth=nbytes / exposed)


def calibrate_turns(prediction: Prediction, measured_: dict, hardware: Hardware) -> Hardware:
    """``hardware`` with its turn latency fitted on a run with more processes than cores, its
    compute and links already fitted: the step past the prediction's, over the run's blocking
    collectives and transfers and the processes queued per core ahead of a peer
    (``Hardware.turn_wait``; a run with a core per process, or with no traffic, leaves
    ``hardware`` as it is)."""
    p = prediction
    queued = hardware.devices_per_node / hardware.cores - 1 if hardware.cores else 0.0
    if queued <= 0 or not p.transfers:
        return hardware
    per_turn = hardware.turn_latency + (measured_["step_s"] - p.step_s) / (p.transfers * queued)
    return dataclasses.replace(hardware, turn_latency=max(0.0, per_turn))


def hardware_toml(hw: Hardware) -> str:
    fields = {f.name: getattr(hw, f.name) for f in dataclasses.fields(hw) if f.name != "name"}
    return f"[{hw.name}]\n" + "".join(f"{k} = {v!r}\n" for k, v in fields.items())
