"""The GPU check, one command: CPU and CUDA agree, and a ~1B Llama trains under each recompute policy.

1. The same small GPT, fp32, a few optimizer steps through ``Trainer.train_step`` on the CPU and
   on CUDA (TF32 off): the losses agree to 1e-4 relative.
2. ``llama-1b`` (1.1B parameters) in bf16 on one GPU, with ``train.recompute`` = none, selective
   and full: tokens/s, MFU (model FLOPs, Korthikanti's Appendix A, over the device's bf16 peak),
   HFU, and ``torch.cuda.max_memory_allocated`` beside the planner's prediction of the rank's
   memory (model states, activations, autocast's weight copies).

3. Block-sparse attention through FlexAttention (compiled, a BlockMask from loom's layout) against
   dense causal ``scaled_dot_product_attention``: forward + backward time and
   ``max_memory_allocated`` at 8k to 64k tokens, bf16, 16 heads of 64, with each layout's density.

It must run where CUDA is; without it, it says so and exits 2. The table goes to ``--out``.

    python bench/gpu.py --out bench/results/gpu.md
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import bench_command, machine, source_line, write_result
from rich.console import Console

from loom.config import load_config
from loom.plan.flops import GPTShape, hardware_flops, model_flops
from loom.plan.hardware import hardware_of
from loom.plan.rank_memory import predict_rank_memory
from loom.train.trainer import Trainer

SMALL = ["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "train.seq_len=128", "train.micro_batch=8"]
COMMON = ["train.eval_every=0", "train.ckpt_every=0", "train.sample_tokens=0", "train.warmup_steps=2"]


def trainer(items: list[str], root: Path) -> Trainer:
    config = load_config(None, [*COMMON, *items])
    return Trainer(config, root, console=Console(file=io.StringIO()), live_progress=False)


def agreement(root: Path, steps: int) -> tuple[list[float], list[float]]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    losses = {}
    for device in ("cpu", "cuda"):
        t = trainer([*SMALL, f"train.steps={steps}", f"train.device={device}", "train.precision=fp32"], root / device)
        losses[device] = [t.train_step(k).loss for k in range(steps)]
        del t
    return losses["cpu"], losses["cuda"]


def llama(root: Path, policy: str, steps: int, seq: int, micro: int) -> dict:
    items = [
        "model.preset=llama-1b",
        f"train.seq_len={seq}",
        f"model.max_seq_len={seq}",
        f"train.micro_batch={micro}",
        "train.grad_accum=1",
        f"train.steps={steps}",
        "train.precision=bf16",
        "train.device=cuda",
        f"train.recompute={policy}",
    ]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = trainer(items, root / policy)
    times = []
    for k in range(steps):
        torch.cuda.synchronize()
        began = time.perf_counter()
        t.train_step(k)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    config, device = t.config, t.device
    step_s = statistics.median(times[2:])
    shape = GPTShape(config.model.n_layers, config.model.d_model, config.model.vocab_size, seq)
    hw = hardware_of("cuda", torch.cuda.get_device_name(device))
    peak = hw.peak_flops("bf16")
    predicted = predict_rank_memory(config, 1, device="cuda")
    out = {
        "policy": policy,
        "tokens_per_s": micro * seq / step_s,
        "mfu": model_flops(shape, micro) / step_s / peak,
        "hfu": hardware_flops(shape, micro, policy) / step_s / peak,
        "max_allocated": torch.cuda.max_memory_allocated(device),
        "predicted": predicted.total,
        "activations": predicted.activations,
        "device": hw.name,
    }
    del t
    return out


SPARSE_LAYOUTS = {
    "sliding_window (3 x 128)": {"mode": "sliding_window", "block": 128, "num_sliding_window_blocks": 3},
    "bigbird (r1 w3 g1, 128)": {"mode": "bigbird", "block": 128, "different_layout_per_head": True},
}


def sparse_attention(seqs: tuple[int, ...] = (8192, 16384, 32768, 65536)) -> list[str]:
    """Rows of section 3: per sequence, dense causal SDPA and each layout through FlexAttention."""
    import torch.nn.functional as F

    from loom.model.block_sparse import flex_block_mask, flex_sparse_attention
    from loom.sparsity import SparsityConfig, make_layout
    from loom.viz.attention import causal_density

    def timed(fn) -> tuple[float, float]:  # noqa: ANN001
        for _ in range(2):  # compile and warm up
            fn().sum().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn().sum().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30

    rows = []
    for seq in seqs:
        q, k, v = (
            torch.randn(1, 16, seq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
        )
        dense_s, dense_gib = timed(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        cells = [f"{seq:,}", f"{1e3 * dense_s:.1f} ms, {dense_gib:.2f} GiB"]
        for params in SPARSE_LAYOUTS.values():
            layout = make_layout(SparsityConfig(**params), 16, seq)
            mask = flex_block_mask(layout, params["block"], seq, "cuda")
            sparse_s, sparse_gib = timed(lambda q=q, k=k, v=v, mask=mask: flex_sparse_attention(q, k, v, mask))
            ideal = 1 / causal_density(layout)
            cells.append(
                f"{1e3 * sparse_s:.1f} ms ({dense_s / sparse_s:.1f}x of ideal {ideal:.1f}x), {sparse_gib:.2f} GiB"
            )
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per llama-1b run (2 warm up)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--out", type=Path, help="write the result as markdown here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device and found none (torch.cuda.is_available() is False).", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="loom-gpu-") as tmp:
        root = Path(tmp)
        cpu, cuda = agreement(root, 4)
        worst = max(abs(a - b) / abs(a) for a, b in zip(cpu, cuda, strict=True))
        rows = [
            llama(root, policy, args.steps, args.seq_len, args.micro_batch) for policy in ("none", "selective", "full")
        ]
        sparse_rows = sparse_attention()
    lines = [
        f"CPU vs CUDA, fp32, small GPT, 4 steps: losses {', '.join(f'{x:.6f}' for x in cpu)} vs "
        f"{', '.join(f'{x:.6f}' for x in cuda)}; "
        f"largest relative difference {worst:.1e} ({'agree' if worst < 1e-4 else 'DIFFER'}).",
        "",
        f"llama-1b, bf16, seq {args.seq_len} x micro-batch {args.micro_batch}, {args.steps} steps (median after 2):",
        "",
        "| recompute | tokens/s | MFU | HFU | max_memory_allocated GiB | predicted GiB | allocated / predicted |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% | "
            f"{r['max_allocated'] / 2**30:.2f} | {r['predicted'] / 2**30:.2f} | {r['max_allocated'] / r['predicted']:.3f} |"
        )
    lines += [
        "",
        "Block-sparse attention, FlexAttention (compiled) from loom's layouts, against dense causal SDPA; "
        "forward + backward, bf16, 16 heads of 64, median of 5; time (speedup against dense of the ideal "
        "1 / density), max_memory_allocated:",
        "",
        "| sequence | dense causal SDPA | " + " | ".join(SPARSE_LAYOUTS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in SPARSE_LAYOUTS) + " |",
        *sparse_rows,
    ]
    print("\n".join(lines))

    def render(when: str) -> str:
        head = [
            "# GPU check",
            "",
            f"Command: `{bench_command('gpu.py')}`",
            "",
            f"Date: {when}",
            "",
            f"Machine: {machine(gpu=True)}",
            "",
            f"Source: {source_line()}",
            "",
            f"Peak used for MFU: {rows[0]['device']} bf16 dense.",
            "",
        ]
        return "\n".join([*head, *lines, ""])

    write_result(args.out, render)
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
