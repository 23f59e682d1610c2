"""Gradient-accumulation fusion: linears computing dW straight into DDP's bucket slots.

The fused and the unfused path must agree bit for bit (losses, every gradient, the weights
after AdamW), no layer's own linear weight may have its gradient copied into its slot, and each parameter's
post-accumulate-grad hook (DDP's bucket count) must run once per backward, as unfused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from loom.config import load_config
from loom.distributed.comm import Comm, Ledger
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.model.recompute import Recompute
from loom.model.transformer import Transformer
from loom.parallel.ddp import DataParallel
from loom.parallel.grad_fusion import GradFusion, fused_linear
from loom.parallel.tensor import TensorParallel
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

MODEL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", "train.seq_len=16"]


def _one_rank_comm() -> Comm:
    return Comm("dp", None, [0], Ledger(0))


class _Slots:
    """A GradHome over one flat buffer: every parameter its slot; the parameters' post-accumulate-grad
    hooks recorded in ``landed``."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.buffer = torch.zeros(sum(p.numel() for p in params))
        self.views, offset = {}, 0
        for p in params:
            self.views[id(p)] = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.landed: list[torch.Tensor] = []
        for p in params:
            p.register_post_accumulate_grad_hook(self.landed.append)

    def grad_slot(self, param: torch.Tensor) -> torch.Tensor | None:
        return self.views.get(id(param))


@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_equals_autograd_bit_for_bit(bias: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias)
    x = torch.randn(3, 7, 24, requires_grad=True)
    dy = torch.randn(3, 7, 40)
    want_y = linear(x)
    want_y.backward(dy)
    want = (want_y.detach(), x.grad.clone(), linear.weight.grad.clone(), None if not bias else linear.bias.grad.clone())
    x.grad, linear.weight.grad, linear.bias = None, None, linear.bias

    home = _Slots([linear.weight])
    fusion = GradFusion(home)
    if bias:
        linear.bias.grad = None
    y = fused_linear(x, linear.weight, linear.bias, fusion)
    y.backward(dy)
    assert torch.equal(y.detach(), want[0]) and torch.equal(x.grad, want[1])
    assert linear.weight.grad.data_ptr() == home.views[id(linear.weight)].data_ptr()  # dW written in its slot
    assert torch.equal(linear.weight.grad, want[2]) and home.landed == [linear.weight]
    if bias:
        assert torch.equal(linear.bias.grad, want[3])

    # a second backward adds in place, as AccumulateGrad does: the slot holds dW + dW
    fused_linear(x, linear.weight, linear.bias, fusion).backward(dy)
    assert torch.equal(linear.weight.grad, want[2] + want[2]) and len(home.landed) == 2


@pytest.mark.parametrize("reads", ["twice", "tied"])
def test_a_weight_read_twice_or_tied_gets_the_sum_and_one_hook_call(reads: str) -> None:
    """Two fused reads, or a fused read and an embedding lookup (a tied head), in one backward:
    ``.grad`` is the unfused sum bit for bit, and the hook runs once, after both."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(10, 10))
    x = torch.randn(4, 10, requires_grad=True)
    ids = torch.tensor([1, 3, 3, 7])

    def forward(linear) -> torch.Tensor:  # noqa: ANN001
        if reads == "twice":
            return linear(linear(x, weight, None), weight, None).square().sum()
        return (linear(x, weight, None) + torch.nn.functional.embedding(ids, weight)).square().sum()

    forward(torch.nn.functional.linear).backward()
    want, weight.grad = weight.grad.clone(), None
    home = _Slots([weight])
    fusion = GradFusion(home)
    seen = []
    weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    forward(lambda a, w, b: fused_linear(a, w, b, fusion)).backward()
    assert weight.grad.data_ptr() == home.views[id(weight)].data_ptr()
    assert torch.equal(weight.grad, want)
    assert len(seen) == 1 and torch.equal(seen[0], want)  # once, with every contribution in


def test_autograd_grad_gets_dw_returned_and_the_slot_untouched() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    x = torch.randn(5, 8, requires_grad=True)
    home = _Slots([linear.weight])
    fusion = GradFusion(home)
    (dw,) = torch.autograd.grad(fused_linear(x, linear.weight, linear.bias, fusion).square().sum(), [linear.weight])
    (want,) = torch.autograd.grad(
        torch.nn.functional.linear(x, linear.weight, linear.bias).square().sum(), [linear.weight]
    )
    assert torch.equal(dw, want)
    assert linear.weight.grad is None and not home.landed and not home.buffer.any()


def test_a_weight_target_is_made_once_and_a_stale_node_falls_back_to_autograd() -> None:
    """The target (and the AccumulateGrad node it holds) is made once per weight and serves every
    later forward, after the graphs that used it are gone. Should the weight's backward run
    another node than the one kept, dW goes back to autograd: the same gradient, not written."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    home = _Slots([linear.weight])
    fusion = GradFusion(home)
    x = torch.randn(5, 8, requires_grad=True)
    target = fusion.target(linear.weight, torch.float32)
    for _ in range(2):
        fused_linear(x, linear.weight, linear.bias, fusion).sum().backward()
        assert fusion.target(linear.weight, torch.float32) is target
    assert linear.weight.grad.data_ptr() == home.views[id(linear.weight)].data_ptr()
    want = linear.weight.grad.clone()  # two backwards' dW, summed in the slot

    other = torch.nn.Parameter(torch.zeros(1))
    target.node = torch.autograd.graph.get_gradient_edge(other).node  # not the node this backward runs
    fused_linear(x, linear.weight, linear.bias, fusion).sum().backward()
    assert torch.equal(linear.weight.grad, want + want / 2)  # autograd added the third dW itself
    assert fusion.target(torch.nn.Parameter(torch.zeros(2, 2)), torch.float32) is None  # no slot: unfused


def test_fused_linear_falls_back_where_it_cannot_fuse() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    home = _Slots([linear.weight])
    fusion = GradFusion(home)
    x = torch.randn(8, 5, requires_grad=True).t()  # not contiguous
    fused_linear(x, linear.weight, linear.bias, fusion).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_linear(torch.randn(5, 8), linear.weight, linear.bias, fusion).float().sum().backward()
    assert len(home.landed) == 2 and not home.buffer.any()  # autograd's own path both times: the slot unused

    seen = []  # a tensor hook on the weight is handed dW itself, as without a home
    linear.weight.grad = None
    linear.weight.register_hook(lambda g: seen.append(g.clone()))
    fused_linear(torch.randn(5, 8), linear.weight, linear.bias, fusion).sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], linear.weight.grad) and not home.buffer.any()


def _train(fuse: bool, overrides: list[str], steps: int = 3, accum: int = 2) -> dict:
    """AdamW steps of a one-rank DDP over the model, ``accum`` micro-batches each."""
    config = load_config(None, [*MODEL, *overrides])
    torch.manual_seed(0)  # dropout's masks, drawn from the default generator here
    tp = TensorParallel.single()
    recompute = Recompute(
        config.train.recompute, config.train.recompute_layers if config.train.recompute != "none" else None
    )
    model = Transformer(config.model, seed=3, tp=tp, recompute=recompute)
    ddp = DataParallel(model, _one_rank_comm(), bucket_mb=0.004)  # several buckets
    if fuse:
        tp.grad_fusion = GradFusion(ddp)
    copied = set()
    keep = ddp._keep_in_bucket
    names = {id(p): n for n, p in model.named_parameters()}

    def counting(param: torch.nn.Parameter, slot: torch.Tensor) -> None:
        copied.add(names[id(param)])
        keep(param, slot)

    ddp._keep_in_bucket = counting
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses, grads = [], []
    for _ in range(steps):
        for k in range(accum):
            x = torch.randint(0, 64, (2, 16), generator=generator)
            with ddp.no_sync() if k < accum - 1 else torch.enable_grad():
                loss = model.loss(x, torch.roll(x, -1, dims=1)) / accum
                loss.backward()
            losses.append(loss.item())
        ddp.finish_gradient_sync()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
        ddp.zero_grad()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "params": params, "copied": copied}


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.family=llama", "model.n_kv_heads=2"],
        ["model.dropout=0.1", "train.recompute=full", "train.recompute_layers=1"],
        ["train.recompute=selective"],
        ["model.reversible=true"],
    ],
    ids=["gpt2", "llama-gqa", "full-recompute", "selective", "reversible"],
)
def test_fused_ddp_training_is_bit_identical_and_copies_no_own_weight(overrides: list[str]) -> None:
    plain, fused = _train(False, overrides), _train(True, overrides)
    assert fused["losses"] == plain["losses"]
    for got, want in zip(fused["grads"], plain["grads"], strict=True):
        for name in want:
            assert torch.equal(got[name], want[name]), name
    for name, want in plain["params"].items():
        assert torch.equal(fused["params"][name], want), name
    linears = {n for n in plain["params"] if n.endswith(("_proj.weight", "lm_head.weight"))}  # an untied head too
    assert linears and linears <= plain["copied"]  # unfused: every gradient copied into its slot
    assert not linears & fused["copied"]  # fused: every linear's dW was written there by its GEMM
    assert fused["copied"] == plain["copied"] - linears  # the rest (norms, biases, embeddings) as before


def _buckets_left_in_backward(fuse: bool) -> list[int]:
    """How many buckets had left when backward returned (a one-rank DDP, three buckets)."""
    tp = TensorParallel.single()
    model = Transformer(load_config(None, MODEL).model, seed=3, tp=tp)
    ddp = DataParallel(model, _one_rank_comm(), bucket_mb=0.02)
    if fuse:
        tp.grad_fusion = GradFusion(ddp)
    x = torch.randint(0, 64, (2, 16))
    model.loss(x, torch.roll(x, -1, dims=1)).backward()
    left = ddp._next_launch
    ddp.finish_gradient_sync()
    return [left, len(ddp.buckets)]


def test_fused_buckets_still_leave_during_backward() -> None:
    """The hooks of AccumulateGrad nodes that received nothing still run (what the fusion
    relies on for overlap): every bucket has left when backward returns, as unfused."""
    assert _buckets_left_in_backward(True) == _buckets_left_in_backward(False)
    left, total = _buckets_left_in_backward(True)
    assert total >= 3 and left == total


def _rank_run(overrides: list[str], run_dir: str) -> dict:
    config = load_config(None, overrides)
    trainer = Trainer(config, Path(run_dir), dist=init_distributed(config.parallel))
    fused = trainer.tp.grad_fusion is not None
    ddp, names = trainer.update.ddp, {id(p): n for n, p in trainer.model.named_parameters()}
    copied, keep = set(), ddp._keep_in_bucket

    def counting(param: torch.nn.Parameter, slot: torch.Tensor) -> None:
        copied.add(names[id(param)])
        keep(param, slot)

    ddp._keep_in_bucket = counting
    trainer.run()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    linears = {n for n in copied if n.endswith(("_proj.weight", "lm_head.weight"))}
    return {"fused": fused, "params": params, "copied_linears": linears}


@pytest.mark.parametrize(
    ("world", "layout"),
    [(2, {}), (4, {"parallel.tp": 2, "parallel.sequence_parallel": True, "model.family": "llama"})],
    ids=["dp2", "dp2-tp2-sp"],
)
def test_trainer_fusion_on_and_off_agree_bit_for_bit(
    tmp_path: Path, text_corpus: Path, world: int, layout: dict
) -> None:
    """gloo ranks, accumulation, clipping (and at tp 2 the column-parallel linears entering their
    region together): ddp.fuse_weight_grads changes no bit of the run."""
    common = {"train.global_batch": 8, "train.micro_batch": 2, "train.steps": 3, "train.eval_every": 0, **layout}
    runs = {}
    for fuse in (True, False):
        items = tiny_overrides(text_corpus, **common, **{"ddp.fuse_weight_grads": fuse, "ddp.transport": "backend"})
        runs[fuse] = run_ranks(_rank_run, world, args=(items, str(tmp_path / str(fuse))), timeout_s=120)
        assert {r["fused"] for r in runs[fuse]} == {fuse}
        assert all(bool(r["copied_linears"]) != fuse for r in runs[fuse])  # fused: no linear's dW copied
    on, off = (read_metrics(tmp_path / str(f)) for f in (True, False))
    assert [(r["loss"], r["grad_norm"]) for r in on] == [(r["loss"], r["grad_norm"]) for r in off]
    for a, b in zip(runs[True], runs[False], strict=True):
        for name, want in b["params"].items():
            assert torch.equal(a["params"][name], want), name
