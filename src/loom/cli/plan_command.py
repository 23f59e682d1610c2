"""``loom plan``: rank the layouts of a model on N devices (``loom.plan``), show a finished run's
prediction beside what it measured, or fit this machine's rates on runs (``--calibrate``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loom.errors import LoomError


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
    # a probe for the model's max_seq_len alone: dense attention, so a sparse layout's block need not divide 1
    config = load_config(None, [*items, 'model.attention="dense"', "train.seq_len=1"])
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
