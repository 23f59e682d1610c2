"""Block-sparse attention against dense causal attention: time, peak memory, and the longest
sequence a small model trains on within a memory budget.

Part 1, the kernel: forward + backward of one attention call, batch 1, 8 heads of 64, for
sequence lengths 1k to 16k, each layout (block 64) through both of loom's CPU kernels (the
compiled C++ one, ``model.sparse_attention.kernel = "cpp"``, what ``auto`` runs where it builds;
and the one of torch ops, ``"torch"``) beside dense causal ``scaled_dot_product_attention``
(torch's fused flash kernel on the CPU). Each case runs in
its own process (peak resident memory above the inputs', from ``ru_maxrss``), cases
alternating round by round; times are the median over rounds of each process's best of
``CALLS`` calls, after ``WARMUP`` calls that are not timed (a training step's calls are a
process's later ones: on this host, a virtual machine that reclaims freed memory, huge pages
fresh to the process come from memory the hypervisor backs on first touch, and the C++ kernel's
first 6-8 calls at 8k tokens took 118 ms against 53 after; touching and freeing 2 GiB of huge
pages first removed the difference).
The ideal speedup is dense causal FLOPs over sparse FLOPs: 1 / (the layout's density against
dense causal). Goal: at 8k and beyond, the speedup reaches 0.6x the ideal; judged for the
default kernel per layout and length on each round's own pair (the sparse call against dense in
the same round): met when every round reaches it, met in the median only when the median does.
The torch-ops kernel's fractions are listed beside, not judged.

Part 2, training: one step of a small model (2 layers, d_model 256, 4 heads, micro-batch 1)
at doubling sequence lengths, dense (with dropout 0.1, so the CPU runs an unfused core that
holds s x s tensors, as dense attention without a fused kernel does: torch's math path, 12
bytes a score, until 918d1b4, since then loom's dropout core, 5, and from a034423 only over the
causal triangle's row runs; and without dropout, the
flash core) and sliding-window sparse, until the step's peak resident memory
passes ``BUDGET_GIB`` (checked against the planner first, so nothing runs that would not fit)
or one step passes ``STEP_LIMIT_S``. Goal: sparse's longest is at least 8x dense's.

Part 3, ``loom train`` end to end: the demo run (``configs/demo.toml``, the Python standard
library, 128-token sequences) for ``DEMO_STEPS`` steps with each attention kind: the loss of
the first and the last step, validation loss, and tokens/s.

    python bench/sparse_attention.py --out bench/results/sparse_attention.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import bench_command, result_head, write_result

LAYOUTS = {
    "sliding_window (3)": {"mode": "sliding_window", "num_sliding_window_blocks": 3},
    "bigbird (r1 w3 g1)": {"mode": "bigbird", "num_random_blocks": 1, "different_layout_per_head": True},
    "bslongformer (w5 g0)": {"mode": "bslongformer", "num_sliding_window_blocks": 5},
    "fixed (l4 g1)": {"mode": "fixed", "num_local_blocks": 4, "num_global_blocks": 1},
}
SEQS = (1024, 2048, 4096, 8192, 16384)
HEADS, HEAD_DIM, BLOCK = 8, 64, 64
KERNELS = {"cpp": "C++ kernel (the default)", "torch": "torch-ops kernel (kernel = torch)"}
ROUNDS = 3
GOAL = 0.6  # of the ideal speedup, at 8k tokens and beyond
WARMUP = 8  # forward + backward calls per process before the timed ones (every kind alike)
CALLS = 5  # forward + backward calls per process; its best is its time
BUDGET_GIB = 16.0
STEP_LIMIT_S = 120.0
TRAIN_SEQS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
DEMO_STEPS = 300
DEMO_KINDS = {
    "dense": [],
    "sparse fixed": ['model.attention="sparse"'],
    "sparse bigbird": ['model.attention="sparse"', 'model.sparse_attention.mode="bigbird"'],
    "sparse bslongformer": ['model.attention="sparse"', 'model.sparse_attention.mode="bslongformer"'],
    "sparse variable": ['model.attention="sparse"', 'model.sparse_attention.mode="variable"'],
    "sparse bigbird, torch-ops kernel": [
        'model.attention="sparse"',
        'model.sparse_attention.mode="bigbird"',
        'model.sparse_attention.kernel="torch"',
    ],
    "top-k (16)": ['model.attention="topk"', "model.top_k=16"],
    "lsh (8 buckets, 2 rounds, chunk 32)": ['model.attention="lsh"', "model.lsh_chunk=32"],
    "reversible, dense": ["model.reversible=true"],
}
ROOT = Path(__file__).resolve().parents[1]


def demo_run(name: str, items: list[str], root: Path) -> str:
    from loom.train.metrics import read_metrics

    run_dir = root / "".join(c if c.isalnum() else "_" for c in name)
    cmd = [sys.executable, "-m", "loom.cli", "train", "--config", str(ROOT / "configs" / "demo.toml")]
    cmd += ["--run-dir", str(run_dir), "--no-progress", "--set", f"train.steps={DEMO_STEPS}"]
    cmd += ["--set", f"train.eval_every={DEMO_STEPS}", "--set", "train.ckpt_every=0", "--set", "train.sample_tokens=0"]
    for item in items:
        cmd += ["--set", item]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        return f"| {name} | failed: {done.stderr.strip().splitlines()[-1:]} | | | |"
    records = read_metrics(run_dir)
    speed = statistics.median(r["tokens_per_s"] for r in records[1:])
    return (
        f"| {name} | {records[0]['loss']:.3f} | {records[-1]['loss']:.3f} | {records[-1].get('val_loss', float('nan')):.3f} "
        f"| {speed:,.0f} |"
    )


# ----------------------------------------------------------------------------- workers (own process)


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _round_verdict(kind: str, seq: int, median: float, rounds: list[float] | None) -> str:
    """The project's rule on one layout and length: met when every round reaches the goal."""
    if not rounds:
        return f"- {kind} at {seq:,}: {median:.2f} of the ideal (rounds not paired: a run failed)"
    low, high = min(rounds), max(rounds)
    judged = "met" if low >= GOAL else "met in the median only" if median >= GOAL else "missed"
    return f"- {kind} at {seq:,}: {median:.2f} of the ideal, rounds {low:.2f}-{high:.2f}: {judged}"


def kernel_worker(kind: str, seq: int) -> dict:
    import torch
    import torch.nn.functional as F

    from loom.model.block_sparse import Slots, block_sparse_attention
    from loom.model.block_sparse_cpp import KeptBlocks, cpp_block_sparse_attention
    from loom.parallel.host_allocator import set_host_allocator
    from loom.sparsity import SparsityConfig, make_layout
    from loom.viz.attention import causal_density

    set_host_allocator(threads=2)  # as `loom train` does for one process on this host's 2 cores
    torch.set_num_threads(2)
    q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, requires_grad=True) for _ in range(3))
    density = 0.5 * (1 + 1 / (seq // BLOCK))  # dense causal against the full square
    if kind == "dense":

        def run() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        ratio, walk = 1.0, ""
    elif kind.endswith("@cpp"):
        layout = make_layout(SparsityConfig(block=BLOCK, **LAYOUTS[kind.removesuffix("@cpp")]), HEADS, seq)
        kept = KeptBlocks.of(layout, BLOCK)
        ratio, walk = causal_density(layout), ""

        def run() -> torch.Tensor:
            return cpp_block_sparse_attention(q, k, v, kept)

    else:
        layout = make_layout(SparsityConfig(block=BLOCK, **LAYOUTS[kind.removesuffix("@torch")]), HEADS, seq)
        slots = Slots.of(layout, BLOCK)
        ratio = causal_density(layout)
        walk = "window by window" if slots.windows else f"row by row (band {slots.band}, runs of {slots.run})"

        def run() -> torch.Tensor:
            return block_sparse_attention(q, k, v, slots)

    grad = torch.randn(1, HEADS, seq, HEAD_DIM)
    base = _rss()
    times = []
    for _ in range(WARMUP + CALLS):
        q.grad = k.grad = v.grad = None  # as a training step's zero_grad: the call's time, not accumulating into .grad
        start = time.perf_counter()
        run().backward(grad)
        times.append(time.perf_counter() - start)
    return {
        "time": min(times[WARMUP:]),
        "peak": _rss() - base,
        "causal_density": ratio,
        "density": density,
        "walk": walk,
    }


def train_worker(kind: str, seq: int) -> dict:
    import torch

    from loom.config import load_config
    from loom.model.transformer import Transformer
    from loom.parallel.host_allocator import set_host_allocator

    set_host_allocator(threads=2)  # as `loom train` does for one process on this host's 2 cores
    torch.set_num_threads(2)
    model = Transformer(load_config(None, _train_items(kind, seq)).model)
    x = torch.randint(0, 256, (1, seq))
    base = _rss()
    start = time.perf_counter()
    model.loss(x, x).backward()
    return {"time": time.perf_counter() - start, "peak": _rss() - base}


def _spawn(mode: str, kind: str, seq: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", mode, kind, str(seq)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        print(f"  {mode} {kind} {seq} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- part 2 planning


def _train_items(kind: str, seq: int) -> list[str]:
    items = ["model.n_layers=2", "model.d_model=256", "model.n_heads=4", "model.vocab_size=256"]
    items += [f"model.max_seq_len={seq}", f"train.seq_len={seq}"]
    if kind == "dense, unfused core":
        items.append("model.dropout=0.1")
    if kind.startswith("sparse"):
        items += ['model.attention="sparse"', f"model.sparse_attention.block={BLOCK}"]
        items += ['model.sparse_attention.mode="sliding_window"', "model.sparse_attention.num_sliding_window_blocks=3"]
    return items


def _predicted_gib(kind: str, seq: int) -> float:
    """The planner's activation bytes of one step (both layers), plus the logits' (fp32, saved)."""
    from loom.config import load_config
    from loom.plan.activations import Dtypes, attention_kernel, layer_activation_bytes
    from loom.plan.rank_memory import layer_shape

    config = load_config(None, _train_items(kind, seq))
    layer = layer_activation_bytes(
        layer_shape(config),
        seq,
        1,
        dtypes=Dtypes(4, 4),
        kernel=attention_kernel(
            "cpu", config.model.dropout, config.model.attention, config.model.sparse_attention.kernel
        ),
    )
    return (2 * layer + 3 * 4 * seq * 256) / 2**30


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, kind, seq = sys.argv[2], sys.argv[3], int(sys.argv[4])
        print(json.dumps((kernel_worker if mode == "kernel" else train_worker)(kind, seq)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the tables here (markdown)")
    parser.add_argument("--skip-train", action="store_true", help="skip part 2 (the memory budget)")
    parser.add_argument("--skip-demo", action="store_true", help="skip part 3 (loom train of each kind)")
    args = parser.parse_args()

    kinds = ["dense", *(f"{layout}@{kernel}" for kernel in KERNELS for layout in LAYOUTS)]
    found: dict[tuple[str, int], list[dict]] = {}
    for r in range(ROUNDS):
        for seq in SEQS:
            order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]  # rotate who runs first
            for kind in order:
                got = _spawn("kernel", kind, seq)
                if got is not None:
                    found.setdefault((kind, seq), []).append(got)
        print(f"round {r + 1} of {ROUNDS} done", flush=True)
    rows, fractions, paired = {kernel: [] for kernel in KERNELS}, {}, {}
    for kernel, seq in ((kernel, seq) for kernel in KERNELS for seq in SEQS):
        dense = statistics.median(x["time"] for x in found[("dense", seq)])
        dense_peak = statistics.median(x["peak"] for x in found[("dense", seq)])
        cells = [f"{seq:,}", f"{1e3 * dense:.0f} ms, {dense_peak / 2**20:.0f} MiB"]
        for kind in (f"{layout}@{kernel}" for layout in LAYOUTS):
            runs = found.get((kind, seq), [])
            if not runs:
                cells.append("failed")
                continue
            t = statistics.median(x["time"] for x in runs)
            speedups = [dense / x["time"] for x in runs]
            ideal = 1 / runs[0]["causal_density"]
            fractions[(kind, seq)] = (dense / t) / ideal
            dense_runs = found[("dense", seq)]
            if len(dense_runs) == len(runs):  # each round's sparse call against the same round's dense
                paired[(kind, seq)] = [(d["time"] / x["time"]) / ideal for d, x in zip(dense_runs, runs, strict=True)]
            cells.append(
                f"{1e3 * t:.0f} ms ({min(speedups):.1f}-{max(speedups):.1f}x of ideal {ideal:.1f}x: "
                f"{fractions[(kind, seq)]:.2f}), {statistics.median(x['peak'] for x in runs) / 2**20:.0f} MiB"
            )
        rows[kernel].append("| " + " | ".join(cells) + " |")
        print(rows[kernel][-1], flush=True)
    long = [f for (kind, seq), f in fractions.items() if seq >= 8192 and kind.endswith("@cpp")]
    verdict = [
        f"The C++ kernel (the default): at 8k and 16k the speedup reaches {min(long):.2f}-{max(long):.2f} of the "
        f"ideal (goal {GOAL}: the medians {'all reach it' if min(long) >= GOAL else 'do not all reach it'}; "
        "each layout's verdict, judged on its rounds, below).",
        *(
            _round_verdict(kind.removesuffix("@cpp"), seq, fractions[(kind, seq)], paired.get((kind, seq)))
            for kind, seq in fractions
            if seq >= 8192 and kind.endswith("@cpp")
        ),
        "The torch-ops kernel, not judged: "
        + ", ".join(
            f"{kind.removesuffix('@torch')} at {seq:,} {f:.2f}"
            for (kind, seq), f in fractions.items()
            if seq >= 8192 and kind.endswith("@torch")
        )
        + " of the ideal.",
    ]
    for kernel in KERNELS:
        window = [statistics.median(x["peak"] for x in found[(f"sliding_window (3)@{kernel}", s)]) for s in SEQS]
        growth = [b / a for a, b in zip(window, window[1:])]
        verdict.append(
            f"Peak memory of the sliding window per doubling of the sequence, {KERNELS[kernel]}: "
            + ", ".join(f"x{g:.2f}" for g in growth)
            + " (linear: x2)."
        )

    train_rows, longest = [], {}
    if not args.skip_train:
        for kind in ("dense, unfused core", "dense, flash core", "sparse, sliding window (3)"):
            for seq in TRAIN_SEQS:
                predicted = _predicted_gib(kind, seq)
                if predicted > BUDGET_GIB:
                    train_rows.append(f"| {kind} | {seq:,} | predicted {predicted:.1f} GiB: not run | - |")
                    break
                got = _spawn("train", kind, seq)
                if got is None or got["peak"] / 2**30 > BUDGET_GIB:
                    train_rows.append(f"| {kind} | {seq:,} | failed or over the budget | - |")
                    break
                train_rows.append(f"| {kind} | {seq:,} | {got['peak'] / 2**30:.2f} GiB | {got['time']:.1f} s |")
                print(train_rows[-1], flush=True)
                longest[kind] = seq
                growth = 4 if kind.startswith("dense") else 2  # the attention's work per doubling
                if got["time"] * growth > STEP_LIMIT_S:
                    why = f"not run: the step would take about {got['time'] * growth:.0f} s"
                    train_rows.append(f"| {kind} | {seq * 2:,} | {why} | - |")
                    break
        ratio = longest.get("sparse, sliding window (3)", 0) / max(1, longest.get("dense, unfused core", 1))
        verdict.append(
            f"Longest trained sequence within {BUDGET_GIB:.0f} GiB: sparse {longest.get('sparse, sliding window (3)', 0):,}, "
            f"dense with the unfused core {longest.get('dense, unfused core', 0):,} ({ratio:.0f}x; goal 8x: "
            f"{'met' if ratio >= 8 else 'missed'}); dense with torch's flash core "
            f"{longest.get('dense, flash core', 0):,} (its memory is linear too: it stops on time, not memory)."
        )
    demo_rows = []
    if not args.skip_demo:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="loom-sparse-demo-") as tmp:
            for name, items in DEMO_KINDS.items():
                demo_rows.append(demo_run(name, items, Path(tmp)))
                print(demo_rows[-1], flush=True)
    print("\n".join(verdict))

    def render(when: str) -> str:
        job = f"batch 1, {HEADS} heads of {HEAD_DIM}, block {BLOCK}, fp32, {ROUNDS} rounds"
        head = result_head(
            "Block-sparse attention against dense causal attention", bench_command("sparse_attention.py"), when, job
        )
        body = [
            "## Forward + backward of one attention call",
            "",
            "Each cell: median time, (the per-round speedups against dense of the ideal 1 / density: the median's "
            "fraction of the ideal), peak resident memory above the inputs'.",
            "",
        ]
        for kernel, title in KERNELS.items():
            body += [
                f"### {title}",
                "",
                "| sequence | dense causal SDPA | " + " | ".join(LAYOUTS) + " |",
                "| --- | --- | " + " | ".join("---" for _ in LAYOUTS) + " |",
                *rows[kernel],
                "",
            ]
        body += [
            "How the torch-ops kernel walked each layout (`Slots.of`): "
            + "; ".join(
                f"{kind}: "
                + ", ".join(
                    f"{seq:,} {found[(f'{kind}@torch', seq)][0]['walk']}"
                    for seq in SEQS
                    if found.get((f"{kind}@torch", seq))
                )
                for kind in LAYOUTS
            )
            + ". The C++ kernel computes each query block against its kept key blocks, no more.",
            "",
        ]
        if train_rows:
            body += [
                f"## One training step of a small model within {BUDGET_GIB:.0f} GiB",
                "",
                "2 layers, d_model 256, 4 heads, micro-batch 1, fp32.",
                "",
                "| attention | sequence | peak memory | step |",
                "| --- | --- | --- | --- |",
                *train_rows,
                "",
            ]
        if demo_rows:
            body += [
                f"## `loom train` of the demo run, {DEMO_STEPS} steps, each attention kind",
                "",
                "| attention | first loss | last loss | validation loss | tokens/s |",
                "| --- | --- | --- | --- | --- |",
                *demo_rows,
                "",
            ]
        return "\n".join(head + body + verdict + [""])

    write_result(args.out, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
