"""Tensor and sequence parallelism: parity with the single process, communication, memory.

Every layout trains several optimizer steps with the trainer and must match the
single-process run of the same config: per-step loss and gradient norm, then (after
training) the logits, the loss and every parameter gradient of one more batch, and the
parameters themselves. The byte vocabulary (257 tokens) is not divisible by 2 or 4, so
the vocabulary padding is exercised everywhere.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_overrides

from loom.config import load_config
from loom.distributed.comm import model_bytes
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.model.transformer import Transformer
from loom.parallel import tensor as tensor_module
from loom.parallel.full_state import full_model_state, gather_tensor
from loom.parallel.grads import PARTIAL_TAG, sum_partial_grads
from loom.parallel.tensor import TensorParallel
from loom.parallel.vocab import gather_vocab_logits
from loom.train.batches import batch_offsets, get_batch
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

STEPS = 3
LAYOUTS_2 = {
    "gpt2 tp2": {"parallel.tp": 2},
    "gpt2 tp2 sp": {"parallel.tp": 2, "parallel.sequence_parallel": True},
    "llama gqa tp2 sp": {
        "model.family": "llama",
        "model.n_kv_heads": 2,
        "parallel.tp": 2,
        "parallel.sequence_parallel": True,
    },
}
LAYOUTS_4 = {
    "llama kv2 tp4 sp (replicated kv)": {
        "model.family": "llama",
        "model.n_kv_heads": 2,
        "parallel.tp": 4,
        "parallel.sequence_parallel": True,
    },
    "gpt2 tp4": {"parallel.tp": 4},
    "gpt2 dp2 x tp2 sp": {"parallel.tp": 2, "parallel.sequence_parallel": True},
    "llama untied tp4": {"model.family": "llama", "parallel.tp": 4},
}


def layout_overrides(corpus: Path, extra: dict) -> list[str]:
    common = {
        "train.steps": STEPS,
        "train.global_batch": 4,
        "train.micro_batch": 2,
        "train.eval_every": 0,
        "train.ckpt_every": 0,
        "parallel.timeout_s": 60,
    }
    return tiny_overrides(corpus, **{**common, **extra})


def probe(trainer: Trainer) -> dict:
    """Logits, loss and full parameter gradients of one validation batch, plus full parameters."""
    config = trainer.config
    offsets = batch_offsets(len(trainer.data.val), config.train.seq_len, 2, config.train.seed, 0, stream=1)
    x, y = get_batch(trainer.data.val, config.train.seq_len, offsets)
    model, tp = trainer.model, trainer.tp
    model.zero_grad(set_to_none=True)
    loss = model.loss(x, y)
    with trainer.update.no_sync():
        loss.backward()  # every dp replica probes the same batch: no dp averaging needed
    places = model.placements
    sum_partial_grads([(place, p.grad) for _, p, place in places.named()], tp.comm)
    with torch.no_grad():
        logits = gather_vocab_logits(model(x), tp, config.model.vocab_size)
    grads = {
        name: gather_tensor(p.grad, place, tp.comm) if place.tp_dim is not None and tp.size > 1 else p.grad
        for name, p, place in places.named()
    }
    params = full_model_state(model, places, tp.comm)
    return {"loss": loss.item(), "logits": logits, "grads": grads, "params": params}


def _train_layouts(layouts: dict[str, list[str]], root: str) -> dict:
    out = {}
    for name, overrides in layouts.items():
        config = load_config(None, overrides)
        ctx = init_distributed(config.parallel)
        trainer = Trainer(config, Path(root) / name, dist=ctx)
        trainer.run()
        result = probe(trainer)
        result["metrics"] = read_metrics(Path(root) / name) if ctx.is_main else None
        out[name] = result if ctx.is_main else None
    return out


def single_process(corpus: Path, extra: dict, run_dir: Path) -> dict:
    unsplit = {k: v for k, v in extra.items() if not k.startswith("parallel.")}
    trainer = Trainer(load_config(None, layout_overrides(corpus, unsplit)), run_dir)
    trainer.run()
    result = probe(trainer)
    result["metrics"] = read_metrics(run_dir)
    return result


def check_parity(name: str, got: dict, want: dict) -> None:
    for a, b in zip(got["metrics"], want["metrics"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), name
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), name
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-5, msg=name)
    for param, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][param], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: grad {param}")
    for param, value in want["params"].items():
        # Adam divides by sqrt(v): near-zero gradients turn round-off into ~1e-6 updates
        torch.testing.assert_close(got["params"][param], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {param}")


@pytest.mark.parametrize(("world", "layouts"), [(2, LAYOUTS_2), (4, LAYOUTS_4)], ids=["2 ranks", "4 ranks"])
def test_layouts_match_the_single_process(tmp_path: Path, text_corpus: Path, world: int, layouts: dict) -> None:
    overrides = {name: layout_overrides(text_corpus, extra) for name, extra in layouts.items()}
    results = run_ranks(_train_layouts, world, args=(overrides, str(tmp_path / "tp")), timeout_s=240)[0]
    for name, extra in layouts.items():
        check_parity(name, results[name], single_process(text_corpus, extra, tmp_path / "one" / name))


# ----------------------------------------------------------------------------- communication and memory

B, S, LAYERS = 2, 16, 2
MEMORY_MODULES = (torch.nn.LayerNorm, torch.nn.Dropout)


def _count_and_measure(sequence_parallel: bool) -> dict:
    overrides = [
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=4",
        "model.vocab_size=64",
        "train.seq_len=16",
        "model.dropout=0.1",
        "parallel.tp=2",
        f"parallel.sequence_parallel={str(sequence_parallel).lower()}",
    ]
    config = load_config(None, overrides)
    ctx = init_distributed(config.parallel)
    tp = TensorParallel(ctx.comm("tp"), sequence_parallel)
    model = Transformer(config.model, seed=0, tp=tp)
    x = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(0))
    saved = {"bytes": 0, "inside": 0}

    def enter(*_):
        saved["inside"] += 1

    def leave(*_):
        saved["inside"] -= 1

    for module in model.modules():
        if isinstance(module, MEMORY_MODULES):
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)

    def pack(t: torch.Tensor):
        if saved["inside"] and not isinstance(t, torch.nn.Parameter):
            saved["bytes"] += t.numel() * t.element_size()
        return t

    ctx.ledger.take_step_totals()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(x, torch.roll(x, -1, 1))
    loss.backward()
    sum_partial_grads([(place, p.grad) for _, p, place in model.placements.named()], tp.comm)
    entries = [(e.op, e.tag, e.numel) for e in ctx.ledger.recent(1000) if e.tag in ("tp", "tp-sp")]
    return {
        "entries": entries,
        "bytes": ctx.ledger.totals().get("tp", 0),
        "saved": saved["bytes"],
        "tags": sorted({e.tag for e in ctx.ledger.recent(1000)}),
    }


def _both_modes() -> dict:
    return {"plain": _count_and_measure(False), "sp": _count_and_measure(True)}


def test_communication_and_activation_memory_per_layer() -> None:
    plain, sp = (run_ranks(_both_modes, 2, timeout_s=90)[0][k] for k in ("plain", "sp"))
    bsh, t = B * S * 32, 2
    # per layer 2 all-reduces forward + 2 backward; plus the embedding's exit and the head's entry
    regions = 4 * LAYERS + 2
    assert [(op, n) for op, _, n in plain["entries"]] == [("all_reduce", bsh)] * regions
    mapping_bytes = regions * model_bytes("all_reduce", t, 4 * bsh)  # = 8bsh(t-1)/t elements per layer
    assert sum(model_bytes("all_reduce", t, 4 * n) for _, _, n in plain["entries"]) == mapping_bytes
    # SP: each all-reduce becomes an all-gather plus a reduce-scatter of the same total volume, and
    # each column entry (QKV and MLP per layer, the head) all-gathers its saved slice again in backward
    entries = 2 * LAYERS + 1
    ops = [op for op, _, _ in sp["entries"]]
    assert ops.count("all_gather") == regions + entries and ops.count("reduce_scatter") == regions
    assert len(ops) == 2 * regions + entries
    regather_bytes = entries * model_bytes("all_gather", t, 4 * bsh)
    assert sum(model_bytes(op, t, 4 * n) for op, _, n in sp["entries"]) == mapping_bytes + regather_bytes
    # norms and dropout run on the local sequence slice: 1/t of their saved activations
    assert plain["saved"] > 0
    assert sp["saved"] * t == plain["saved"]
    assert PARTIAL_TAG in sp["tags"] and PARTIAL_TAG not in plain["tags"]  # SP's partial gradients summed


class _RecordingComm:
    """A tp group of two seen from rank 0 that moves nothing (the peer's share is zero, or a
    copy of ours for all-gather) and records, in order, each call and each wait."""

    name, size, rank = "tp", 2, 0

    def __init__(self, events: list) -> None:
        self.events = events

    def _done(self, op: str, tag: str, numel: int, async_op: bool):
        self.events.append((op, tag, numel, async_op))
        return SimpleNamespace(wait=lambda: self.events.append("wait")) if async_op else None

    def all_reduce(self, t, op="sum", async_op=False, tag=""):
        return self._done("all_reduce", tag, t.numel(), async_op)

    def all_gather(self, output, input, async_op=False, tag=""):
        output.view(2, -1).copy_(input.reshape(1, -1))
        return self._done("all_gather", tag, output.numel(), async_op)

    def reduce_scatter(self, output, input, op="sum", async_op=False, tag=""):
        output.copy_(input.reshape(2, -1)[0].view_as(output))
        return self._done("reduce_scatter", tag, input.numel(), async_op)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["plain", "sp"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_entering_with_the_column_linears_reduces_dx_once_behind_the_weight_gradients(
    monkeypatch: pytest.MonkeyPatch, sequence_parallel: bool, autocast: bool
) -> None:
    events: list = []
    tp = TensorParallel(_RecordingComm(events), sequence_parallel)
    real = tensor_module._weight_grads

    def weight_grads(*args):
        events.append("dW")
        return real(*args)

    monkeypatch.setattr(tensor_module, "_weight_grads", weight_grads)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 8, 16, generator=g, requires_grad=True)
    weights = [torch.randn(6, 16, generator=g, requires_grad=True) for _ in range(3)]
    biases = [torch.randn(6, generator=g, requires_grad=True), None, torch.randn(6, generator=g, requires_grad=True)]
    leaves = [x0, *weights, biases[0], biases[2]]

    def run(entry):
        for leaf in leaves:
            leaf.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = entry(x0 * 1.0)  # not a leaf, as a norm's output is not
        sum((o.float() * (i + 1)).sin().sum() for i, o in enumerate(outs)).backward()
        return [o.detach() for o in outs], [leaf.grad for leaf in leaves]

    def reference(x):
        # under SP the fake all-gather repeats x and the fake reduce-scatter keeps the first
        # chunk of dX: only the first copy carries gradient back to x
        full = torch.cat([x, x.detach()], dim=1) if sequence_parallel else x
        return [torch.nn.functional.linear(full, w, b) for w, b in zip(weights, biases)]

    want_outs, want_grads = run(reference)
    events.clear()
    got_outs, got_grads = run(lambda x: tp.enter_linear(x, weights, biases))
    for got, want in zip(got_outs, want_outs):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == want.dtype and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # forward: the entry alone; backward: under SP the saved slice gathered again (started
    # before dX, waited after it), then one reduction of the summed dX (b*s*h), launched before
    # the three weight gradients and waited for after them
    reduce = ("reduce_scatter", "tp-sp") if sequence_parallel else ("all_reduce", "tp")
    n = 2 * 8 * 16 * (2 if sequence_parallel else 1)
    gather = [("all_gather", "tp-sp", n, True), "wait"] if sequence_parallel else []
    assert events == [*gather, *gather, (*reduce, n, True), "dW", "dW", "dW", "wait"]


# ----------------------------------------------------------------------------- dropout and checkpoints


def _dropout_and_checkpoints(corpus: str, root: str, single_ckpt: str) -> dict:
    root_path = Path(root)
    out = {}

    def train(name: str, resume: str | None = None, **extra) -> list | None:
        config = load_config(None, layout_overrides(Path(corpus), {"parallel.tp": 2, **extra}))
        ctx = init_distributed(config.parallel)
        Trainer(config, root_path / name, resume_from=Path(resume) if resume else None, dist=ctx).run()
        return read_metrics(root_path / name) if ctx.is_main else None

    dropout = {"model.dropout": 0.2, "train.steps": 3}
    out["dropout_a"] = train("dropout_a", **dropout)
    out["dropout_b"] = train("dropout_b", **dropout)
    out["resumed_from_tp1"] = train("resumed", resume=single_ckpt, **{"train.steps": 6, "train.ckpt_every": 3})
    out["tp2_full"] = train("tp2_full", **{"train.steps": 6, "train.ckpt_every": 3})
    return out


def test_dropout_streams_and_checkpoints_across_tp_layouts(tmp_path: Path, text_corpus: Path) -> None:
    six = {"train.steps": 6, "train.ckpt_every": 3}
    single = Trainer(load_config(None, layout_overrides(text_corpus, six)), tmp_path / "single")
    single.run()
    want = read_metrics(tmp_path / "single")
    halfway = tmp_path / "single" / "checkpoints" / "step_000003"
    got = run_ranks(_dropout_and_checkpoints, 2, args=(str(text_corpus), str(tmp_path), str(halfway)), timeout_s=180)[0]

    # dropout: reproducible run to run, and tp=2 behaves like tp=1 in distribution
    assert got["dropout_a"] == [
        {**r, **{k: got["dropout_a"][i][k] for k in ("tokens_per_s", "step_s", "elapsed_s")}}
        for i, r in enumerate(got["dropout_b"])
    ]
    one = Trainer(
        load_config(None, layout_overrides(text_corpus, {"model.dropout": 0.2, "train.steps": 3})),
        tmp_path / "dropout_one",
    )
    one.run()
    for a, b in zip(got["dropout_a"], read_metrics(tmp_path / "dropout_one"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.03)
        assert a["loss"] != b["loss"]  # other masks: a real draw, not a copy

    # a tp=1 checkpoint resumes at tp=2, and a tp=2 checkpoint at tp=1, continuing exactly
    for a, b in zip(got["resumed_from_tp1"], want[3:], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    back = Trainer(
        load_config(None, layout_overrides(text_corpus, six)),
        tmp_path / "back",
        resume_from=tmp_path / "tp2_full" / "checkpoints" / "step_000003",
    )
    back.run()
    for a, b in zip(read_metrics(tmp_path / "back"), want[3:], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
