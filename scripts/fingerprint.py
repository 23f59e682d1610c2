"""Bit-exact fingerprints of short training runs across layouts, to show a refactor changed no result.

Runs a fixed matrix of layouts (1, 2 and 4 gloo ranks: dp, tp, sp, pp with every schedule,
ZeRO 1-3, offload, 16-bit, GQA with replicated KV heads, dropout, accumulation, clipping
that bites) through ``Trainer`` for a few steps, and records each step's loss and gradient
norm as hex floats plus a sha256 of the final checkpoint's tensors::

    python scripts/fingerprint.py --out /tmp/before.json        # on the old tree
    python scripts/fingerprint.py --compare /tmp/before.json    # on the new one: exit 1 on any difference

Not a test: a deliberate numerical change (another summation order) changes the bits, and
the parity tests, not this, decide whether that is still correct.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from loom.config import load_config
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.train.checkpoint import load_checkpoint
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

COMMON = {
    "model.n_layers": 4,
    "model.d_model": 32,
    "model.n_heads": 4,
    "model.max_seq_len": 64,
    "model.dropout": 0.1,
    "train.seq_len": 32,
    "train.micro_batch": 2,
    "train.global_batch": 8,
    "train.steps": 3,
    "train.warmup_steps": 1,
    "train.grad_clip": 0.5,
    "train.eval_every": 0,
    "train.eval_batches": 2,
    "train.ckpt_every": 0,
    "train.sample_tokens": 0,
    "parallel.timeout_s": 60,
}
LLAMA = {"model.family": "llama", "model.n_kv_heads": 2}
KV1 = {"model.family": "llama", "model.n_kv_heads": 1}
LAYOUTS = {
    1: {
        "single": {},
        "single llama": LLAMA,
        "single bf16": {"train.precision": "bf16"},
        "single fp16": {"train.precision": "fp16"},
        "single zero1": {"zero.stage": 1},
    },
    2: {
        "dp2 shm": {},
        "dp2 backend": {"ddp.transport": "backend"},
        "dp2 fp16": {"train.precision": "fp16"},
        "tp2": {"parallel.tp": 2},
        "tp2 sp llama kv1": {**KV1, "parallel.tp": 2, "parallel.sequence_parallel": True},
        "pp2 gpipe": {"parallel.pp": 2, "parallel.schedule": "gpipe"},
        "pp2 1f1b": {"parallel.pp": 2},
        "pp2 zero_bubble": {"parallel.pp": 2, "parallel.schedule": "zero_bubble"},
        "pp2 interleaved": {"parallel.pp": 2, "parallel.vp": 2, "parallel.schedule": "interleaved_1f1b"},
        "zero1": {"zero.stage": 1},
        "zero2": {"zero.stage": 2},
        "zero3": {"zero.stage": 3},
        "zero2 offload": {"zero.stage": 2, "zero.offload": "optimizer"},
        "zero3 bf16": {"zero.stage": 3, "train.precision": "bf16"},
    },
    4: {
        "dp2 tp2 sp": {"parallel.tp": 2, "parallel.sequence_parallel": True},
        "dp2 pp2 1f1b": {"parallel.pp": 2},
        "tp2 pp2 zero_bubble llama": {**LLAMA, "parallel.tp": 2, "parallel.pp": 2, "parallel.schedule": "zero_bubble"},
        "pp4 interleaved": {
            "parallel.pp": 4,
            "parallel.vp": 1,
            "parallel.schedule": "interleaved_1f1b",
            "train.global_batch": 8,
        },
        "zero3 tp2 sp fp16": {
            "zero.stage": 3,
            "parallel.tp": 2,
            "parallel.sequence_parallel": True,
            "train.precision": "fp16",
        },
        "zero2 tp2 sp llama kv1": {**KV1, "zero.stage": 2, "parallel.tp": 2, "parallel.sequence_parallel": True},
        "zero1 pp2 zero_bubble": {"zero.stage": 1, "parallel.pp": 2, "parallel.schedule": "zero_bubble"},
        "zero3 pp2 1f1b": {"zero.stage": 3, "parallel.pp": 2},
        "tp4 sp llama kv2": {**LLAMA, "parallel.tp": 4, "parallel.sequence_parallel": True},
        "zero1 tp4 llama kv2": {**LLAMA, "zero.stage": 1, "parallel.tp": 4},
    },
}


def _items(corpus: str, extra: dict) -> list[str]:
    values = {**COMMON, "data.corpus": corpus, **extra}
    return [
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
        for k, v in values.items()
    ]


def _run(layouts: dict, corpus: str, root: str) -> dict:
    out = {}
    for name, extra in layouts.items():
        items = _items(corpus, {**extra, "train.ckpt_every": COMMON["train.steps"]})
        config = load_config(None, items)
        ctx = init_distributed(config.parallel)
        run_dir = Path(root) / name.replace(" ", "_")
        Trainer(config, run_dir, dist=ctx, live_progress=False).run()
        if ctx.is_main:
            records = read_metrics(run_dir)
            state = load_checkpoint(run_dir).model_state
            digest = hashlib.sha256()
            for key in sorted(state):
                digest.update(key.encode())
                digest.update(state[key].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
            out[name] = {
                "loss": [float(r["loss"]).hex() for r in records],
                "grad_norm": [float(r["grad_norm"]).hex() for r in records],
                "val_loss": float(records[-1]["val_loss"]).hex(),
                "weights": digest.hexdigest()[:16],
            }
    return out


def _corpus(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(
            "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40)), encoding="utf-8"
        )
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the fingerprints here (JSON)")
    parser.add_argument(
        "--compare", type=Path, help="compare with fingerprints written earlier; exit 1 on a difference"
    )
    parser.add_argument("--only", help="comma-separated layout names")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="loom-fingerprint-") as tmp:
        corpus = _corpus(Path(tmp) / "corpus")
        for world, layouts in LAYOUTS.items():
            chosen = {n: e for n, e in layouts.items() if only is None or n in only}
            if not chosen:
                continue
            results.update(
                run_ranks(_run, world, args=(chosen, corpus, str(Path(tmp) / f"w{world}")), timeout_s=900, init=False)[
                    0
                ]
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if args.compare is None:
        print(json.dumps(results, indent=1))
        return 0
    want = json.loads(args.compare.read_text())
    bad = 0
    for name, got in results.items():
        same = want.get(name) == got
        bad += not same
        print(f"{'same' if same else 'DIFFERENT':9} {name}")
        if not same and name in want:
            for key in got:
                if got[key] != want[name][key]:
                    print(f"          {key}: {want[name][key]} -> {got[key]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
