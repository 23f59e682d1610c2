"""The ``loom`` commands around a run: generate, convert, tokenizer, plot, config, presets,
attention-layout and schedule (each imports what it needs when called)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loom.errors import LoomError
from loom.parallel.pipeline.simulate import TIMELINE_FILE


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
    try:
        sparse = config_from_dict({"model": {"attention": "sparse", "sparse_attention": params}}).model.sparse_attention
        layout = make_layout(sparse, args.heads, args.seq_len)
    except LoomError as error:  # the layout's checks name config keys: say this command's flags
        raise LoomError(_as_flags(error.problem), _as_flags(error.fix)) from None
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


# config keys the layout's checks name, as attention-layout's flags (the specific ones first)
LAYOUT_FLAGS = (
    ("model.sparse_attention.block", "--block"),
    ("model.sparse_attention.mode", "--kind"),
    ("model.sparse_attention.", "--param "),
    ("train.seq_len", "--seq-len"),
)


def _as_flags(text: str) -> str:
    for key, flag in LAYOUT_FLAGS:
        text = text.replace(key, flag)
    return text


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
