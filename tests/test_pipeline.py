"""Pipeline parallelism: every schedule, alone and with dp and tp, matches the single process,
and zero-bubble's split backward (I, then W) does each gradient once.

Each layout trains several optimizer steps with 4 micro-batches and must give the
single-process run's per-step loss and gradient norm; its final checkpoint (stages
merged on rank 0, full tensors) must hold the single-process parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from torch.utils.flop_counter import FlopCounterMode

from loom.config import ModelConfig, load_config
from loom.distributed.comm import Comm, Ledger
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.errors import LoomError
from loom.model.transformer import Transformer
from loom.parallel.ddp import DataParallel
from loom.parallel.pipeline.partition import rank_stages, split_layers
from loom.parallel.pipeline.runtime import RECEIVES, _Receives
from loom.parallel.pipeline.schedules import build_schedule
from loom.parallel.tensor import TensorParallel
from loom.parallel.weight_grad import WeightGradStore, backward_input
from loom.train.checkpoint import load_checkpoint
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

LAYOUTS_2 = {
    "gpt2 pp2 gpipe": {"parallel.pp": 2, "parallel.schedule": "gpipe"},
    "gpt2 pp2 1f1b": {"parallel.pp": 2, "parallel.schedule": "1f1b"},
    # dropout's masks are the single process's in any dp/pp layout (loom.parallel.random)
    "llama pp2 zero_bubble, dropout": {
        "model.family": "llama",
        "model.dropout": 0.1,
        "parallel.pp": 2,
        "parallel.schedule": "zero_bubble",
    },
    "gpt2 pp2 interleaved": {"parallel.pp": 2, "parallel.vp": 2, "parallel.schedule": "interleaved_1f1b"},
}
LAYOUTS_4 = {
    "llama pp4 interleaved": {
        "model.family": "llama",
        "model.n_layers": 8,
        "parallel.pp": 4,
        "parallel.vp": 2,
        "parallel.schedule": "interleaved_1f1b",
    },
    "gpt2 pp4 zero_bubble": {"parallel.pp": 4, "parallel.schedule": "zero_bubble"},
    "gpt2 dp2 x pp2 1f1b, dropout": {"model.dropout": 0.1, "parallel.pp": 2},
    # llama: an untied head on the last stage, whose loss has no embedding to ask for its vocab range
    "llama gqa tp2 sp x pp2 1f1b": {
        "model.family": "llama",
        "model.n_kv_heads": 2,
        "parallel.pp": 2,
        "parallel.tp": 2,
        "parallel.sequence_parallel": True,
    },
    "gpt2 tp2 sp x pp2 zero_bubble": {
        "parallel.pp": 2,
        "parallel.tp": 2,
        "parallel.sequence_parallel": True,
        "parallel.schedule": "zero_bubble",
    },
}


def layout_overrides(corpus: Path, extra: dict) -> list[str]:
    common = {
        "model.n_layers": 4,
        "train.steps": 3,
        "train.global_batch": 8,
        "train.micro_batch": 2,
        "train.eval_every": 3,
        "train.ckpt_every": 0,
        "parallel.timeout_s": 60,
    }
    return tiny_overrides(corpus, **{**common, **extra})


def _train_layouts(layouts: dict[str, list[str]], root: str) -> dict:
    out = {}
    for name, overrides in layouts.items():
        config = load_config(None, overrides)
        ctx = init_distributed(config.parallel)
        Trainer(config, Path(root) / name, dist=ctx).run()
        out[name] = read_metrics(Path(root) / name) if ctx.is_main else None
    return out


@pytest.mark.parametrize(("world", "layouts"), [(2, LAYOUTS_2), (4, LAYOUTS_4)], ids=["2 ranks", "4 ranks"])
def test_schedules_match_the_single_process(tmp_path: Path, text_corpus: Path, world: int, layouts: dict) -> None:
    overrides = {name: layout_overrides(text_corpus, extra) for name, extra in layouts.items()}
    got = run_ranks(_train_layouts, world, args=(overrides, str(tmp_path / "pp")), timeout_s=300)[0]
    for name, extra in layouts.items():
        model_only = {k: v for k, v in extra.items() if k.startswith("model.")}
        single = Trainer(load_config(None, layout_overrides(text_corpus, model_only)), tmp_path / "one" / name)
        single.run()
        for a, b in zip(got[name], read_metrics(tmp_path / "one" / name), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), name
            assert "bubble_measured" in a and a["comm_bytes_pp"] > 0
        assert got[name][-1]["val_loss"] == pytest.approx(
            read_metrics(tmp_path / "one" / name)[-1]["val_loss"], rel=1e-5
        )
        merged = load_checkpoint(tmp_path / "pp" / name).model_state
        want = single.model.state_dict()
        assert merged.keys() == want.keys(), name
        for param, value in want.items():  # atol: a near-zero gradient's round-off through Adam (test_3d.py)
            torch.testing.assert_close(merged[param], value, rtol=1e-4, atol=5e-5, msg=f"{name}: {param}")
        timeline = json.loads((tmp_path / "pp" / name / "pipeline_timeline.json").read_text())
        assert len(timeline["ranks"]) == int(extra["parallel.pp"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("head", [False, True], ids=["middle stage", "last stage"])
def test_zero_bubble_w_does_the_weight_gradient_work_once(family: str, head: bool) -> None:
    """Zero-bubble's I gives the input gradient and touches no ``.grad``; W does the linears'
    dW matmuls (the FLOPs I skipped: I + W = one backward) and hands every parameter the plain
    backward's gradient, DDP's hook firing once per parameter."""
    cfg = ModelConfig(family=family, n_layers=4, d_model=32, n_heads=4, max_seq_len=16, vocab_size=61)
    layers = range(2, 4)
    store = WeightGradStore()
    plain = Transformer(cfg, layers=layers, embed=False, head=head)
    split = Transformer(cfg, layers=layers, embed=False, head=head, tp=TensorParallel.single(store))  # same init
    x0, y = torch.randn(2, 16, 32), torch.randint(0, 61, (2, 16))
    dout = None if head else torch.randn(2, 16, 32)

    def forward(model: Transformer, x: torch.Tensor) -> torch.Tensor:
        out = model.run_stage(x, layers, False, head)
        return model.loss_from_logits(out, y) if head else out

    x = x0.clone().requires_grad_()
    out = forward(plain, x)
    with FlopCounterMode(display=False) as backward_flops:
        out.backward(dout)

    ddp = DataParallel(split, Comm("dp", None, [0], Ledger(0)))  # .grad: views into its buckets
    fired = {id(p): 0 for p in split.parameters()}
    for p in split.parameters():
        p.register_post_accumulate_grad_hook(lambda p: fired.__setitem__(id(p), fired[id(p)] + 1))
    xs = x0.clone().requires_grad_()
    with store.recording() as recorded:
        out = forward(split, xs)
    linears = 6 * len(layers) + head if family == "gpt2" else 7 * len(layers) + head  # q k v o + mlp (+ head)
    assert len(recorded) == linears
    with FlopCounterMode(display=False) as i_flops:
        dx, w = backward_input(out, dout, xs, list(split.parameters()), recorded)
    torch.testing.assert_close(dx, x.grad)
    assert not any(fired.values()) and all(b.ready == 0 for b in ddp.buckets)
    assert all(not p.grad.any() for p in split.parameters())  # the buckets are still zero

    dw_flops = sum(2 * dy.numel() * weight.shape[1] for dy, *_, weight in w.linears)  # 2 N out in each
    with FlopCounterMode(display=False) as w_flops:
        w.run()
    assert w_flops.get_total_flops() == dw_flops > 0
    assert i_flops.get_total_flops() + dw_flops == backward_flops.get_total_flops()
    assert set(fired.values()) == {1}
    assert all(b.ready == len(b.params) for b in ddp.buckets)  # every bucket launched, once
    for (name, p), q in zip(split.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_receives_are_posted_ahead_in_the_order_of_the_actions() -> None:
    """gloo: each receive is posted two receives before its action (so its data lands during
    compute), in action order, so messages match as with blocking receives."""
    events = []

    class Posted:
        def __init__(self, n: int) -> None:
            self.n = n

        def wait(self) -> None:
            events.append(("wait", self.n))

    class FakeComm:
        def irecv(self, buffer: torch.Tensor, src: int, tag: str) -> Posted:
            events.append(("post", len([e for e in events if e[0] == "post"])))
            return Posted(events[-1][1])

    actions = build_schedule("zero_bubble", 3, 4)[1]  # the middle rank receives activations and gradients
    wanted = [a for a in actions if a.kind in RECEIVES]
    receives = _Receives(actions, FakeComm(), lambda: torch.empty(1), ahead=2)
    assert events == [("post", 0), ("post", 1)]
    for i, action in enumerate(wanted):
        receives.take(action)
        posted = [n for kind, n in events if kind == "post"]
        assert posted == list(range(min(i + 3, len(wanted))))  # this one and two more
        assert events[-1] == ("wait", i)
    with pytest.raises(RuntimeError, match="out of order"):
        _Receives(actions, FakeComm(), lambda: torch.empty(1), ahead=0).take(wanted[1])


def test_partition_is_megatron_interleaving() -> None:
    plans = [rank_stages(8, 2, 2, rank) for rank in range(2)]
    assert [p.layers for p in plans[0]] == [range(0, 2), range(4, 6)]  # stages 0 and 2
    assert [p.layers for p in plans[1]] == [range(2, 4), range(6, 8)]  # stages 1 and 3
    assert plans[0][0].embed and plans[1][1].head and not plans[1][0].head
    assert split_layers(5, 2, costs=[1, 1, 1, 1, 4]) == [range(0, 4), range(4, 5)]  # balanced by cost


def test_tp_pipeline_with_dropout_draws_the_masks_of_tp_alone(tmp_path: Path, text_corpus: Path) -> None:
    """tp2 sp x pp2 zero-bubble with dropout equals tp2 sp with dropout: stages, the split
    backward and the deferred weight gradients change no mask. (Against the single process tp
    matches in distribution only: each tp rank draws its own heads' and sequence slice's masks.)"""
    dropout = {"model.dropout": 0.1, "parallel.tp": 2, "parallel.sequence_parallel": True}
    piped = {**dropout, "parallel.pp": 2, "parallel.schedule": "zero_bubble"}
    got = run_ranks(
        _train_layouts, 4, args=({"pp": layout_overrides(text_corpus, piped)}, str(tmp_path / "a")), timeout_s=300
    )[0]["pp"]
    want = run_ranks(
        _train_layouts, 2, args=({"tp": layout_overrides(text_corpus, dropout)}, str(tmp_path / "b")), timeout_s=300
    )[0]["tp"]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_pipeline_layouts_are_checked_up_front() -> None:
    with pytest.raises(LoomError, match="n_layers = 4"):
        load_config(None, ["parallel.pp=3"])
    with pytest.raises(LoomError, match="multiple of parallel.pp"):
        load_config(
            None,
            [
                "parallel.pp=2",
                "parallel.vp=2",
                "parallel.schedule=interleaved_1f1b",
                "model.n_layers=8",
                "train.microbatches=3",
            ],
        )
    with pytest.raises(LoomError, match="interleaved_1f1b"):
        load_config(None, ["parallel.pp=2", "parallel.vp=2"])
    with pytest.raises(LoomError, match="parallel.schedule"):
        load_config(None, ["parallel.schedule=pipedream"])


def _one_step_traffic(layouts: dict[str, list[str]], root: str) -> dict:
    """Per layout: the loss each rank logs at step 2 and the scalar collectives of that step."""
    out = {}
    for name, overrides in layouts.items():
        config = load_config(None, overrides)
        ctx = init_distributed(config.parallel)
        trainer = Trainer(config, Path(root) / name, dist=ctx)
        trainer.train_step(0)
        mark = max(e.seq for e in ctx.ledger.recent(1))
        loss = trainer.train_step(1).loss
        calls = [(e.op, e.group, e.tag, e.numel) for e in ctx.ledger.recent(500) if e.seq > mark and e.numel <= 2]
        out[name] = {"loss": loss, "scalars": calls}
    return out


def test_the_logged_loss_rides_with_the_gradient_norm(tmp_path: Path, text_corpus: Path) -> None:
    """tp, pp and ZeRO need the step's loss on every rank (the log, the non-finite check): it is
    reduced in the gradient norm's messages (2 values), never in a collective of its own."""
    layouts = {
        "pp2": layout_overrides(text_corpus, {"parallel.pp": 2}),
        "tp2": layout_overrides(text_corpus, {"parallel.tp": 2}),
        "zero1 dp2": layout_overrides(text_corpus, {"zero.stage": 1}),
    }
    ranks = run_ranks(_one_step_traffic, 2, args=(layouts, str(tmp_path)), timeout_s=120)
    for name in layouts:
        assert ranks[0][name]["loss"] == ranks[1][name]["loss"], name  # every rank logs the same mean
        scalars = ranks[0][name]["scalars"]
        assert all(tag != "metrics" for _, _, tag, _ in scalars), (name, scalars)
        assert [numel for _, _, tag, numel in scalars if tag == "grad-norm"] == [2], (name, scalars)
