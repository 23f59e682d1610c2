"""Which block size to choose on a CPU: one sliding window, the same span in tokens, at blocks
16 to 128.

DeepSpeed's sparsity configs default to ``block = 16``, and loom takes them as they are. Both
of loom's CPU kernels multiply ``block x block`` tiles (the C++ one, the default,
:mod:`loom.model.block_sparse_cpp`, one query block at a time; the torch-ops one,
:mod:`loom.model.block_sparse`, in batched matmuls), so a smaller block wastes less of the
diagonal and of a window's ragged edge but multiplies smaller matrices. This script measures the trade: a causal sliding window whose look-back is
``--lookback`` tokens (``num_sliding_window_blocks = 2 x lookback / block + 1``), forward +
backward of one call (batch 1, 8 heads of 64, fp32, 2 threads) at each block and kernel, beside dense
causal ``scaled_dot_product_attention``; each case in its own process, the cases rotating
round by round, a case's time the best of ``CALLS`` calls after ``WARMUP`` untimed ones (as
``sparse_attention.py``: a process's first calls touch memory this host backs lazily) and the
table the median over rounds.

Per block: the time, the speedup over dense against the ideal (dense causal scores over the
scores the layout keeps, counted element by element: the diagonal block's lower triangle
only), and the time per kept score. Not a goal: a measurement for the README's advice.

    python bench/sparse_blocks.py --out bench/results/sparse_blocks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import bench_command, result_head, write_result

HEADS, HEAD_DIM = 8, 64
BLOCKS = (16, 32, 64, 128)
KERNELS = {"cpp": "C++", "torch": "torch ops"}
WARMUP = 8
CALLS = 5


def kept_scores(layout, block: int) -> int:  # noqa: ANN001
    """Scores a causal layout keeps over its heads: every kept block below the diagonal in full,
    each diagonal block's lower triangle (its queries' own and earlier keys)."""
    import torch

    diagonal = int(torch.diagonal(layout.bool(), dim1=-2, dim2=-1).sum())
    below = int(layout.bool().tril(-1).sum())
    return below * block * block + diagonal * block * (block + 1) // 2


def worker(block: int, seq: int, lookback: int, kernel: str) -> dict:
    """One case: ``block`` 0 is dense causal SDPA."""
    import torch
    import torch.nn.functional as F

    from loom.model.block_sparse import Slots, block_sparse_attention
    from loom.model.block_sparse_cpp import KeptBlocks, cpp_block_sparse_attention
    from loom.parallel.host_allocator import set_host_allocator
    from loom.sparsity import SparsityConfig, make_layout

    set_host_allocator(threads=2)  # as `loom train` does for one process on this host's 2 cores
    torch.set_num_threads(2)
    q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, requires_grad=True) for _ in range(3))
    if block == 0:
        kept = HEADS * seq * (seq + 1) // 2

        def run() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    else:
        config = SparsityConfig(mode="sliding_window", block=block, num_sliding_window_blocks=2 * lookback // block + 1)
        layout = make_layout(config, HEADS, seq)
        kept = kept_scores(layout, block)
        if kernel == "cpp":
            blocks = KeptBlocks.of(layout, block)

            def run() -> torch.Tensor:
                return cpp_block_sparse_attention(q, k, v, blocks)

        else:
            slots = Slots.of(layout, block)

            def run() -> torch.Tensor:
                return block_sparse_attention(q, k, v, slots)

    grad = torch.randn(1, HEADS, seq, HEAD_DIM)
    times = []
    for _ in range(WARMUP + CALLS):
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        run().backward(grad)
        times.append(time.perf_counter() - start)
    return {"time": min(times[WARMUP:]), "kept": kept}


def _spawn(block: int, seq: int, lookback: int, kernel: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(block), str(seq), str(lookback), kernel]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*(int(a) for a in sys.argv[2:5]), sys.argv[5])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    parser.add_argument("--seqs", default="8192,16384", help="comma-separated sequence lengths")
    parser.add_argument("--lookback", type=int, default=256, help="tokens each query looks back (a multiple of 128)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.lookback <= 0 or args.lookback % max(BLOCKS):
        parser.error(f"--lookback {args.lookback}: a positive multiple of {max(BLOCKS)}")
    seqs = [int(s) for s in args.seqs.split(",")]
    cases = [(0, "-"), *((block, kernel) for kernel in KERNELS for block in BLOCKS)]
    found: dict[tuple[int, str, int], list[dict]] = {}
    for r in range(args.rounds):
        for seq in seqs:
            for block, kernel in cases[r % len(cases) :] + cases[: r % len(cases)]:  # rotate who runs first
                found.setdefault((block, kernel, seq), []).append(_spawn(block, seq, args.lookback, kernel))
        print(f"round {r + 1} of {args.rounds} done", flush=True)

    rows = []
    for seq in seqs:
        dense_runs = found[(0, "-", seq)]
        dense = statistics.median(x["time"] for x in dense_runs)
        rows.append(f"| {seq:,} | dense causal SDPA | {1e3 * dense:.0f} ms | - | - |")
        for block, kernel in cases[1:]:
            runs = found[(block, kernel, seq)]
            t = statistics.median(x["time"] for x in runs)
            ideal = dense_runs[0]["kept"] / runs[0]["kept"]
            fractions = [(d["time"] / x["time"]) / ideal for d, x in zip(dense_runs, runs, strict=True)]
            ns = 1e9 * t / runs[0]["kept"]
            rows.append(
                f"| {seq:,} | {KERNELS[kernel]}, block {block} ({2 * args.lookback // block + 1} blocks) | "
                f"{1e3 * t:.0f} ms | "
                f"{dense / t:.1f}x of ideal {ideal:.1f}x: {statistics.median(fractions):.2f} "
                f"(rounds {min(fractions):.2f}-{max(fractions):.2f}) | {ns:.2f} ns |"
            )
            print(rows[-1], flush=True)

    def render(when: str) -> str:
        job = (
            f"batch 1, {HEADS} heads of {HEAD_DIM}, a causal sliding window looking back {args.lookback} tokens, "
            f"fp32, 2 threads, {args.rounds} rounds of best-of-{CALLS} calls after {WARMUP} untimed"
        )
        head = result_head("Block size of a sliding window on a CPU", bench_command("sparse_blocks.py"), when, job)
        body = [
            "Forward + backward of one attention call. Ideal: dense causal scores over the scores the layout "
            "keeps (element by element); the fraction is the median of the per-round speedups over the ideal.",
            "",
            "| sequence | attention | time | speedup over dense | per kept score |",
            "| --- | --- | ---: | --- | ---: |",
            *rows,
            "",
        ]
        return "\n".join(head + body)

    write_result(args.out, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
