"""Dropout off CUDA: loom's mask and attention core against torch's, on the same tensors.

Sides, each timed as the median of ``--calls`` calls, alternating loom and torch call by call:

- ``mask``: drawing a keep mask of n elements on one thread, and with ``--threads``:
  ``loom.model.dropout.keep_mask`` (16 random bits an element from SFC64, uint8) against
  ``torch.empty(n).bernoulli_(1 - p)``, torch's CPU dropout's draw (one thread either way);
- ``dropout``: forward + backward of dropout on a (b, s, h) activation: ``loom.model.dropout.dropout``
  against ``torch.nn.functional.dropout``;
- ``attention``: forward + backward of causal attention with dropout on the probabilities:
  ``loom.model.dropout_attention`` against ``scaled_dot_product_attention(dropout_p=p)`` (on the
  CPU torch's math path), at the recompute bench's two jobs' shapes; also the bytes each keeps
  for backward (saved-tensor hooks, each storage once).

Then ``loom train`` end to end on the demo (``configs/demo.toml``) with dropout 0.1 and without,
so the table shows what dropout costs a user's step. No goal; a measurement. Exit 1 if loom's
mask does not drop p (within 5 sigma).

    python bench/dropout.py --out bench/results/dropout.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import LOOM_TRAIN, bench_command, loom_train, noise_line, result_head, write_result

from loom.model.dropout import dropout, keep_mask, quantized_p
from loom.model.dropout_attention import dropout_attention

P = 0.1
ATTENTION = {  # name -> (batch, heads, seq, head_dim): the recompute bench's jobs
    "8 x 4 heads x 128 tokens (recompute.md)": (8, 4, 128, 64),
    "1 x 32 heads x 512 tokens (recompute_wide.md)": (1, 32, 512, 32),
}


def paired(loom_fn, torch_fn, calls: int) -> tuple[list[float], list[float]]:
    """Seconds of each call, loom's and torch's alternating (which goes first alternates too)."""
    mine, theirs = [], []
    for i in range(calls + 2):
        order = [(loom_fn, mine), (torch_fn, theirs)]
        for fn, out in order if i % 2 else order[::-1]:
            start = time.perf_counter()
            fn()
            if i >= 2:  # two warm-up calls each
                out.append(time.perf_counter() - start)
    return mine, theirs


def saved_bytes(fn) -> int:
    """Bytes ``fn()`` saves for backward, each storage once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def row(what: str, mine: list[float], theirs: list[float], unit: float, label: str, extra: str = "") -> str:
    ratios = sorted(t / m for m, t in zip(mine, theirs, strict=True))
    return (
        f"| {what} | {statistics.median(mine) * unit:.2f} | {statistics.median(theirs) * unit:.2f} | "
        f"{statistics.median(ratios):.2f} ({ratios[len(ratios) // 10]:.2f}-{ratios[-1 - len(ratios) // 10]:.2f}) | "
        f"{label}{extra} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=30, help="timed calls per side and case")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (the mask: 1)")
    p.add_argument("--demo-steps", type=int, default=120, help="loom train steps on the demo, per run")
    p.add_argument("--out", type=Path, help="also write the result as markdown here")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    torch.manual_seed(0)
    rows = [
        "| case | loom | torch | torch / loom (10th-90th percentile of calls) | unit, bytes kept for backward |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    ok = True
    torch.set_num_threads(1)
    for n in (1 << 18, 1 << 21):
        x = torch.empty(n)
        mine, theirs = paired(lambda n=n: keep_mask((n,), P, "cpu"), lambda x=x: x.bernoulli_(1 - P), args.calls)
        rows.append(row(f"mask, {n:,} elements, 1 thread", mine, theirs, 1e9 / n, "ns an element"))
        dropped = 1.0 - keep_mask((n,), P, "cpu").double().mean().item()
        ok &= abs(dropped - quantized_p(P)) < 5 * (P * (1 - P) / n) ** 0.5
    torch.set_num_threads(args.threads)
    if args.threads > 1:  # loom's mask spreads its chunks over torch's threads
        n = 1 << 21
        x = torch.empty(n)
        mine, theirs = paired(lambda: keep_mask((n,), P, "cpu"), lambda: x.bernoulli_(1 - P), args.calls)
        rows.append(row(f"mask, {n:,} elements, {args.threads} threads", mine, theirs, 1e9 / n, "ns an element"))
    x = torch.randn(8, 128, 256, requires_grad=True)
    g = torch.randn_like(x)
    mine, theirs = paired(
        lambda: dropout(x, P).backward(g), lambda: F.dropout(x, P, training=True).backward(g), args.calls
    )
    kept = (saved_bytes(lambda: dropout(x, P)), saved_bytes(lambda: F.dropout(x, P, training=True)))
    rows.append(row("dropout fwd + bwd, 8 x 128 x 256 fp32", mine, theirs, 1e3, "ms", f"; {kept[0]:,} vs {kept[1]:,}"))
    for name, (b, heads, s, d) in ATTENTION.items():
        q, k, v = (torch.randn(b, s, heads, d).transpose(1, 2).requires_grad_() for _ in range(3))
        out_grad = torch.randn(b, heads, s, d)

        def ours(q=q, k=k, v=v, g=out_grad) -> None:
            dropout_attention(q, k, v, P).backward(g)

        def theirs_fn(q=q, k=k, v=v, g=out_grad) -> None:
            F.scaled_dot_product_attention(q, k, v, dropout_p=P, is_causal=True).backward(g)

        mine, theirs = paired(ours, theirs_fn, args.calls)
        kept = (
            saved_bytes(lambda q=q, k=k, v=v: dropout_attention(q, k, v, P)),
            saved_bytes(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, dropout_p=P, is_causal=True)),
        )
        rows.append(row(f"attention fwd + bwd, {name}", mine, theirs, 1e3, "ms", f"; {kept[0]:,} vs {kept[1]:,}"))
    demo = ["train.eval_every=0", "train.ckpt_every=0", "train.sample_tokens=0", f"train.steps={args.demo_steps}"]
    e2e: dict[str, list[float]] = {"dropout 0.1": [], "no dropout": []}
    for r in range(2):  # alternating, twice each; the demo's settings are loom train's defaults
        sides = [("dropout 0.1", ["model.dropout=0.1"]), ("no dropout", [])]
        for label, extra in sides if r % 2 == 0 else sides[::-1]:
            e2e[label].append(statistics.median(loom_train([*demo, *extra], 1, 10)))
    check = f"- loom's mask drops {quantized_p(P):.6f} of the elements within 5 sigma: {'yes' if ok else 'NO'}."
    with_, without = (statistics.median(e2e[k]) for k in ("dropout 0.1", "no dropout"))
    runs = ", ".join(f"{a:,.0f} / {b:,.0f}" for a, b in zip(e2e["dropout 0.1"], e2e["no dropout"], strict=True))
    e2e_line = (
        f"{LOOM_TRAIN} on the demo ({args.demo_steps} steps, median tokens/s after the first 10, 2 runs each, "
        f"alternating): dropout 0.1 {with_:,.0f}, no dropout {without:,.0f} ({with_ / without:.2f} of it; "
        f"runs with / without: {runs})."
    )
    noise = noise_line(load)
    print("\n".join([*rows, "", check, "", e2e_line, "", noise]))

    def render(when: str) -> str:
        job = f"p = {P}; {args.calls} timed calls a side and case, alternating; {args.threads} threads (the mask's rows: as each says)"
        lines = result_head(
            "Dropout off CUDA: loom's mask and core against torch's", bench_command("dropout.py"), when, job
        )
        return "\n".join([*lines, *rows, "", "Checks:", "", check, "", e2e_line, "", noise, ""])

    write_result(args.out, render)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
