"""loom's tensor parallelism against PyTorch's DTensor tensor parallelism on the same multi-rank job.

Sides (``common.py`` says how they are timed):

- ``loom``: ``Trainer.train_step`` with ``parallel.tp`` = the number of ranks (and
  ``parallel.sequence_parallel`` with ``--sequence-parallel``);
- ``DTensor``: the plain (tp=1) loom ``Transformer`` under
  ``torch.distributed.tensor.parallel.parallelize_module`` on a 1-D mesh over the same tp
  group, as torchtitan parallelises a model: q/k/v (gate/up) ``ColwiseParallel``, o/down
  ``RowwiseParallel``, ``PrepareModuleInput`` on the attention and the MLP so their column
  projections share one ``Replicate`` input (one backward all-reduce), the embedding
  ``RowwiseParallel``, the (tied) head weight ``Shard(0)`` with the cross-entropy under
  ``loss_parallel()``; with ``--sequence-parallel`` the norms ``SequenceParallel`` and the
  row outputs reduce-scattered along the sequence. torch's styles take only ``nn.Linear``/
  ``nn.Embedding``, so loom's tp=1 linears and embedding are swapped for torch modules holding
  the same ``Parameter``s; the fused AdamW takes DTensor and plain tensors in separate groups,
  so each of ``build_adamw``'s groups is split in two. DTensor splits K/V heads evenly, so
  every tp size must divide them (loom itself would replicate K/V heads when tp is larger);
- ``loom train``: the command, end to end.

Same model and initial weights (layout-independent init: both sides' shards are slices of the
same weights), the same batch on every tp rank, lr schedule and AdamW; no gradient clipping on
either side (``train.grad_clip = 0``). Goal: loom train at least 1.3x DTensor. Checks (exit 1
if not): loom's region mappings (ledger tags "tp", "tp-sp") send 8bsh(t-1)/t x 4 bytes x
(L + 1/2) per step and rank (2 all-reduces forward and 2 backward of b*s*h fp32 per layer, with
SP an all-gather plus a reduce-scatter of the same volume each, and each column entry's saved
slice all-gathered again in backward, (2L + 1) x (t-1)/t x bsh x 4 more; plus the embedding's
exit and the head's entry), and the two sides' losses agree to 1e-4 over all steps.

``--floor`` adds a third interleaved side, loom's step with those all-reduces skipped (each rank
keeps its partial sums: wrong losses, the same computation): the speed loom would have if
tensor-parallel communication were free, so ``floor / DTensor`` bounds what any transport or
overlap could reach on this machine.

    python bench/tensor_parallel.py --out bench/results/tensor_parallel.md
    python bench/tensor_parallel.py --floor --no-e2e --out bench/results/tensor_parallel_floor.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

from common import (
    ALONE,
    LOOM_TRAIN,
    TIMING,
    Side,
    TrainerSide,
    add_job_args,
    bench,
    bench_command,
    check_args,
    comparison_table,
    goal_lines,
    job_batches,
    job_items,
    join,
    lr_of,
    noise_line,
    prepare,
    result_head,
    rounds_table,
    run_round,
    sizes,
    tokens_per_step,
    write_result,
)
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from loom.distributed.comm import Handle
from loom.distributed.ledger import model_bytes
from loom.model.transformer import Transformer
from loom.optim.adamw import build_adamw

GOAL = 1.3
AGREE_TOL = 1e-4
LOOM, DTENSOR = "loom", "DTensor"
FLOOR = "loom, tp collectives skipped"
MAPPING_TAGS = ("tp/tp", "tp/tp-sp")


def _as_linear(m: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding the very parameters of a tp=1 loom Column/RowParallelLinear."""
    out_features, in_features = m.weight.shape
    lin = nn.Linear(in_features, out_features, bias=m.bias is not None, device="meta")
    lin.weight = m.weight
    lin.bias = m.bias
    return lin


def _as_embedding(m: nn.Module) -> nn.Embedding:
    """An ``nn.Embedding`` holding the very weight of a tp=1 ``VocabParallelEmbedding``."""
    emb = nn.Embedding(*m.weight.shape, device="meta")
    emb.weight = m.weight
    return emb


def dtensor_plan(model: Transformer, sequence_parallel: bool) -> dict[str, object]:
    """Swap loom's tp=1 linears/embedding for torch modules (same Parameters); return the TP plan."""
    sp = sequence_parallel
    seq_out = Shard(1) if sp else Replicate()
    plan: dict[str, object] = {"tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq_out)}
    model.tok_emb = _as_embedding(model.tok_emb)
    if model.lm_head is not None:  # the head reads lm_head.weight directly: only its partition matters
        model.lm_head = _as_linear(model.lm_head)
        plan["lm_head"] = ColwiseParallel()
    if sp and model.pos_emb is not None:  # each rank adds the positions of its own slice of the sequence
        plan["pos_emb"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(0))
    col = ("gate_proj", "up_proj") if model.cfg.family == "llama" else ("up_proj",)
    for key, block in model.blocks.named_children():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.attn, name, _as_linear(getattr(block.attn, name)))
        for name in (*col, "down_proj"):
            setattr(block.mlp, name, _as_linear(getattr(block.mlp, name)))
        prefix = f"blocks.{key}"
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"{prefix}.attn.{name}"] = ColwiseParallel()
        plan[f"{prefix}.attn.o_proj"] = RowwiseParallel(output_layouts=seq_out)
        for name in col:
            plan[f"{prefix}.mlp.{name}"] = ColwiseParallel()
        plan[f"{prefix}.mlp.down_proj"] = RowwiseParallel(output_layouts=seq_out)
        # one Replicate DTensor input shared by Q, K, V (gate, up), as torchtitan's plan does
        plan[f"{prefix}.attn"] = PrepareModuleInput(
            input_layouts=(seq_out, None, None, None, None),  # x, rope, positions, rng, recompute_core
            desired_input_layouts=(Replicate(), None, None, None, None),
            use_local_output=False,
        )
        plan[f"{prefix}.mlp"] = PrepareModuleInput(
            input_layouts=(seq_out,), desired_input_layouts=(Replicate(),), use_local_output=False
        )
        if sp:
            plan[f"{prefix}.attn_norm"] = SequenceParallel(use_local_output=True)
            plan[f"{prefix}.mlp_norm"] = SequenceParallel(use_local_output=True)
    if sp:
        plan["final_norm"] = SequenceParallel(use_local_output=False)
    return plan


class DTensorTP(Side):
    """The tp=1 loom model under ``parallelize_module`` (see the module docstring for the plan)."""

    name = DTENSOR

    def __init__(self, config, ctx, data, mesh: DeviceMesh) -> None:
        self.config, self.data, self.device = config, data, ctx.device
        sp = config.parallel.sequence_parallel
        self.model = Transformer(config.model, seed=config.train.seed, device=ctx.device)
        parallelize_module(self.model, mesh, dtensor_plan(self.model, sp))
        # the head multiplies the final norm's output by the Shard(0) vocabulary weight: make it a
        # Replicate DTensor (all-gathered along the sequence under SP) so the logits come out Shard(-1)
        out = PrepareModuleOutput(
            output_layouts=Shard(1) if sp else Replicate(), desired_output_layouts=Replicate(), use_local_output=False
        )
        parallelize_module(self.model.final_norm, mesh, out)
        optimizer = build_adamw(self.model, config.train, ctx.device)
        groups = []  # the fused kernel takes one kind of tensor per call: split each group in two
        for group in optimizer.param_groups:
            for distributed in (True, False):
                params = [p for p in group["params"] if isinstance(p, DTensor) == distributed]
                if params:
                    groups.append({**group, "params": params})
        optimizer.param_groups.clear()  # no state yet: regrouping loses nothing
        for group in groups:
            optimizer.add_param_group(group)
        self.optimizer = optimizer

    def step(self, k: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_of(self.config, k)
        ((x, y),) = job_batches(self.config, self.data, 1, 0, self.device, steps=[k])[0]
        with loss_parallel():  # the backward of the loss must run under it too
            loss = self.model.loss(x, y)
            loss.backward()
        value = (loss.full_tensor() if isinstance(loss, DTensor) else loss).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value


class SkippedCollectives(TrainerSide):
    """loom's step with the region mappings' all-reduces (ledger tag "tp") skipped: each rank
    goes on with its partial sums, so the losses are wrong but every computation is the same
    size. Its time is what loom's step would take if tensor-parallel communication were free:
    the ceiling of any speed-up over a peer that computes the same (``--floor``)."""

    def __init__(self, name, config, ctx, run_dir) -> None:
        super().__init__(name, config, ctx, run_dir)
        self.comm = ctx.comm("tp")
        self.ledger = None  # its bytes are not the job's

    def step(self, k: int) -> float:
        real = self.comm.all_reduce

        def skipping(t, op="sum", async_op=False, tag=""):
            if tag == "tp":
                return Handle(None, None, None) if async_op else None
            return real(t, op, async_op, tag)

        self.comm.all_reduce = skipping  # this Comm object only, for this step only
        try:
            return super().step(k)
        finally:
            del self.comm.all_reduce


def rank_round(items: list[str], root: str, floor: bool, round_index: int, alone: bool) -> dict:
    ctx, config, data = join(items)
    mesh = DeviceMesh.from_group(ctx.comm("tp").group, ctx.device.type)
    sides = [] if alone else [TrainerSide(LOOM, config, ctx, Path(root) / f"loom-{round_index}")]
    if floor and not alone:
        sides.append(SkippedCollectives(FLOOR, config, ctx, Path(root) / f"floor-{round_index}"))
    sides.append(DTensorTP(config, ctx, data, mesh))
    return run_round(sides, config.train.steps, round_index, alone)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_args(p, d_model=256, steps=30, repeats=5)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per step (every tp rank: the same)")
    p.add_argument("--worlds", default="2,4", help="comma-separated tp sizes (= ranks)")
    p.add_argument("--sequence-parallel", action="store_true", help="both sides with sequence parallelism")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time loom's step with its tp all-reduces skipped (wrong losses; the ceiling of the ratio)",
    )
    args = p.parse_args(argv)
    check_args(p, args)
    worlds = sizes(p, "--worlds", args.worlds, "tp size")
    base = job_items(args, f"train.micro_batch={args.micro_batch}", "train.grad_accum=1", "train.grad_clip=0")
    sp = f"parallel.sequence_parallel={'true' if args.sequence_parallel else 'false'}"
    config = prepare(base)
    if any(config.model.kv_heads % t for t in worlds):
        p.error(f"DTensor splits K/V heads evenly: every tp size must divide {config.model.kv_heads}")
    psi = Transformer(config.model, seed=config.train.seed, device="meta").num_params()
    load = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="loom-bench-tp-") as root:
        for t in worlds:
            items = [*base, f"parallel.tp={t}", sp]
            e2e = {LOOM_TRAIN: items}
            results.append(
                bench(f"tp {t}", t, tokens_per_step(config, 1), rank_round, (items, root, args.floor), args, e2e)
            )

    model = config.model
    job = (
        f"{model.preset} ({model.family}, {model.n_layers} layers, d_model {model.d_model}, {model.n_heads} heads, "
        f"{psi / 1e6:.2f}M parameters), {args.micro_batch} x {args.seq_len} tokens per step (the same on every tp "
        f"rank), sequence parallel {'on' if args.sequence_parallel else 'off'}, {args.steps} steps "
        f"({args.steps - args.warmup} timed) x {args.repeats} rounds, fp32, no clipping, gloo, 1 thread per rank"
    )
    ok, checks = True, []
    bsh = args.micro_batch * args.seq_len * model.d_model
    for r, t in zip(results, worlds, strict=True):
        regions = 4 * model.n_layers + 2
        want = Fraction(regions) * Fraction(model_bytes("all_reduce", t, 4 * bsh))
        if args.sequence_parallel:  # each column entry gathers its saved slice again in backward
            want += Fraction(2 * model.n_layers + 1) * Fraction(model_bytes("all_gather", t, 4 * bsh))
        mapping = {Fraction(sum(v for k, v in tags.items() if k in MAPPING_TAGS)) for tags in r.by_tag[LOOM]}
        other = {k for tags in r.by_tag[LOOM] for k in tags if k.startswith("tp/") and k not in MAPPING_TAGS}
        diff = r.loss_diff(LOOM, DTENSOR)
        good = mapping == {want} and diff < AGREE_TOL
        ok &= good
        checks.append(
            f"- {r.label}: loom's region mappings sent {', '.join(f'{float(b):,.0f}' for b in sorted(mapping))} B "
            f"per step and rank against 8bsh(t-1)/t x 4 x (L + 1/2) = {float(want):,.0f} "
            f"({'equal' if mapping == {want} else 'DIFFERENT'}); other tp traffic: {', '.join(sorted(other)) or 'none'}; "
            f"losses of loom and DTensor differ by at most {diff:.1e} ({'agree' if diff < AGREE_TOL else 'DIFFER'})."
        )
    alone = f"{DTENSOR} {ALONE}"
    pairs = [(LOOM, DTENSOR), *([] if args.no_e2e else [(LOOM_TRAIN, alone)])]
    sides = [DTENSOR, LOOM, *([FLOOR] if args.floor else []), *([] if args.no_e2e else [alone, LOOM_TRAIN])]
    table = comparison_table(results, "tp", sides, [*pairs, *([(FLOOR, DTENSOR)] if args.floor else [])])
    goals = goal_lines(results, [(a, b, GOAL) for a, b in reversed(pairs)])
    noise = noise_line(load)
    print("\n".join([*table, "", *goals, "", *checks, "", noise]))

    def render(when: str) -> str:
        title = "Tensor parallel: loom vs DTensor parallelize_module"
        lines = result_head(title, bench_command("tensor_parallel.py"), when, job)
        lines += [*table, "", "Goals:", "", *goals, "", "Checks:", "", *checks, "", "Per round:", ""]
        lines += [*rounds_table(results, sides), "", f"Timing: {TIMING}", "", noise, ""]
        return "\n".join(lines)

    write_result(args.out, render)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
