"""Activation memory: the planner's formulas against the papers and against what loom's layers
save for backward, measured by the activation meter (saved-tensor hooks, each storage once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from loom.attention_walk import row_slots, saved_probability_columns
from loom.config import load_config
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.model.recompute import Recompute
from loom.model.transformer import Transformer
from loom.parallel.memory import ActivationMeter
from loom.parallel.random import ParallelRNG
from loom.parallel.tensor import TensorParallel
from loom.plan.activations import Dtypes, LayerShape, attention_kernel, korthikanti_layer_bytes, layer_activation_bytes
from loom.plan.rank_memory import choose_recompute_layers, predict_rank_memory
from loom.sparsity import SparsityConfig, make_layout
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

B, S, H, HEADS = 2, 32, 64, 4
CASES = [  # (tp, sp, recompute)
    (1, False, "none"),
    (2, False, "none"),
    (2, True, "none"),
    (1, False, "selective"),
    (2, True, "selective"),
    (1, False, "full"),
    (2, True, "full"),
]


def test_korthikanti_table_2_on_their_gpt3_shape() -> None:
    s, b, h, a, t = 2048, 1, 12288, 96, 8  # GPT-3 175B, micro-batch 1, tp 8 (their Table 3)
    sbh = s * b * h
    assert korthikanti_layer_bytes(s, b, h, a) == sbh * 34 + 5 * a * s * s * b  # Eq. 1
    assert korthikanti_layer_bytes(s, b, h, a, t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert korthikanti_layer_bytes(s, b, h, a, t, sp=True) == pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)))
    assert korthikanti_layer_bytes(s, b, h, a, t, recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert korthikanti_layer_bytes(s, b, h, a, t, sp=True, recompute="selective") == pytest.approx(sbh * 34 / t)
    assert korthikanti_layer_bytes(s, b, h, a, t, sp=True, recompute="full") == 2 * sbh / t
    # Section 4's point for this shape: 5as/h = 80 > 34, the core attention dominates; sp +
    # selective keep 34/(10 + 24/8 + 80/8) = 1/5.4 of tp alone
    ratio = korthikanti_layer_bytes(s, b, h, a, t, sp=True, recompute="selective") / korthikanti_layer_bytes(
        s, b, h, a, t
    )
    assert ratio == pytest.approx(34 / 8 / (10 + 3 + 10))


def _measure(family: str, cases: list, dropout: float = 0.1, attention: str = "dense", kernel: str = "auto") -> dict:
    overrides = [
        f'model.attention="{attention}"',
        f'model.sparse_attention.kernel="{kernel}"',
        "model.sparse_attention.block=8",
        "model.top_k=8",
        "model.lsh_chunk=8",
        f'model.family="{family}"',
        "model.n_layers=1",
        f"model.d_model={H}",
        f"model.n_heads={HEADS}",
        f"model.dropout={dropout}",
        "model.vocab_size=64",
        f"model.max_seq_len={S}",
        f"train.seq_len={S}",
        "parallel.tp=2",
    ]
    config = load_config(None, overrides)
    ctx = init_distributed(config.parallel)
    out = {}
    for tp_size, sp, policy in cases:
        comm = ctx.comm("tp") if tp_size > 1 else TensorParallel.single().comm
        tp = TensorParallel(comm, sp)
        rng = ParallelRNG(torch.device("cpu"), tp_rank=tp.rank)
        rng.reseed(0, 0)
        model = Transformer(config.model, seed=0, tp=tp, rng=rng, recompute=Recompute(policy))
        x = torch.randn(B, S // (tp_size if sp else 1), H, requires_grad=True)
        meter = ActivationMeter()
        with torch.autocast("cpu", dtype=torch.bfloat16), meter.forward(0):
            y = model.run_stage(x, [0], embed=False, head=False)
        y.float().sum().backward()
        out[(tp_size, sp, policy)] = meter.take_step()["mem_activation_bytes"]
    return out


@pytest.mark.parametrize(
    ("dropout", "attention", "kernel"),
    [
        (0.1, "dense", "auto"),
        (0.0, "dense", "auto"),
        (0.0, "sparse", "cpp"),
        (0.0, "sparse", "torch"),
        (0.0, "topk", "auto"),
        (0.0, "lsh", "auto"),
    ],
    ids=[
        "dropout (unfused core)",
        "no dropout (flash core)",
        "block-sparse core (C++)",
        "block-sparse core (torch ops)",
        "top-k core",
        "lsh core",
    ],
)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_measured_layer_activations_equal_the_formula(family: str, dropout: float, attention: str, kernel: str) -> None:
    measured = run_ranks(_measure, 2, args=(family, CASES, dropout, attention, kernel), timeout_s=120)[0]
    cfg = load_config(None, [f'model.family="{family}"', f"model.d_model={H}", f"model.n_heads={HEADS}"]).model
    columns = 0  # the probabilities the torch-ops block-sparse kernel keeps: the padded slots of each query's row
    if attention == "sparse" and kernel == "torch":
        layout = make_layout(SparsityConfig(block=8), HEADS, S)
        columns = saved_probability_columns(row_slots(layout)[0].shape[-1], 8)
        assert columns > 0  # this small layout keeps them
    shape = LayerShape(family, H, HEADS, cfg.kv_heads, cfg.ffn_dim, cfg.use_bias, dropout, 8, (2, 8, True), columns)
    for (t, sp, policy), got in measured.items():
        want = layer_activation_bytes(
            shape, S, B, t, sp, policy, Dtypes(params=4, compute=2), attention_kernel("cpu", dropout, attention, kernel)
        )
        assert got == pytest.approx(want, rel=0.05), (family, t, sp, policy, got, want)
    # and the orderings the paper's table implies, measured
    assert measured[(2, True, "none")] < measured[(2, False, "none")] < measured[(1, False, "none")]
    assert measured[(1, False, "full")] < measured[(1, False, "selective")] <= measured[(1, False, "none")]


def test_alike_micro_batches_are_measured_once_and_credited_the_same_bytes(monkeypatch) -> None:
    """The meter hooks the first of a run's alike forwards only; the others (this step's and
    later steps') are credited its figures, which equal what measuring each of them gives
    (three in flight, with dropout)."""
    config = load_config(
        None, ["model.n_layers=2", f"model.d_model={H}", f"model.n_heads={HEADS}", "model.dropout=0.1"]
    )
    config.model.vocab_size = 64
    model = Transformer(config.model, seed=0)
    hooked = []
    real = torch.autograd.graph.saved_tensors_hooks
    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", lambda *a: hooked.append(1) or real(*a))
    records = {}
    for alike in (None, "chunk"):
        meter, losses = ActivationMeter(), []
        hooked.clear()
        for step in range(2):
            for k in range(3):
                x = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(k))
                with meter.forward(k, alike=alike):
                    losses.append(model.loss(x, x))
            torch.stack(losses).sum().backward()
            losses.clear()
            for k in range(3):
                meter.release(k)
            records[(alike, step)] = meter.take_step()
        assert len(hooked) == (6 if alike is None else 1)
    assert records[(None, 0)]["mem_activation_bytes"] > 0
    assert records[(None, 0)] == records[("chunk", 0)] == records[("chunk", 1)] == records[(None, 1)]


# ----------------------------------------------------------------------------- whole runs


def _tiny(corpus: Path, **extra) -> list[str]:
    return tiny_overrides(corpus, **{"model.dropout": 0.1, "train.steps": 2, "train.eval_every": 0, **extra})


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"train.recompute": "selective"},
        {"train.recompute": "full"},
        {"train.recompute": "full", "train.recompute_layers": 1},
        {"train.precision": "bf16"},
        {"zero.stage": 1, "train.precision": "bf16"},
    ],
    ids=["none", "selective", "full", "full 1 of 2", "bf16 autocast", "zero1 bf16"],
)
def test_a_run_reports_memory_by_category_as_predicted(tmp_path: Path, text_corpus: Path, extra: dict) -> None:
    config = load_config(None, _tiny(text_corpus, **extra))
    Trainer(config, tmp_path).run()
    record = read_metrics(tmp_path)[-1]
    predicted = predict_rank_memory(config, dp=1)
    assert record["mem_activation_bytes"] == pytest.approx(predicted.activations, rel=0.05)
    states = record["mem_params_bytes"] + record["mem_grads_bytes"] + record["mem_optim_bytes"]
    assert states == pytest.approx(predicted.params + predicted.grads + predicted.optim, rel=0.01)
    assert record["mem_weight_copy_bytes"] == pytest.approx(predicted.weight_copies, rel=0.05, abs=1)
    assert record["mem_peak_host_bytes"] > states + record["mem_activation_bytes"]


def _run_zero3(items: list[str], run_dir: str) -> dict | None:
    config = load_config(None, items)
    ctx = init_distributed(config.parallel)
    Trainer(config, Path(run_dir), dist=ctx).run()
    return read_metrics(Path(run_dir))[-1] if ctx.is_main else None


@pytest.mark.parametrize("tp", [1, 2])
def test_zero3_ranks_report_the_predicted_activations(tmp_path: Path, text_corpus: Path, tp: int) -> None:
    """ZeRO-3 frees each unit's parameters after its forward, and the allocator may hand that
    address to the next activation: the meter must still count it (a storage is skipped as
    a parameter's, not remembered as one)."""
    items = _tiny(text_corpus, **{"zero.stage": 3, "train.grad_accum": 2, "parallel.tp": tp, "parallel.timeout_s": 60})
    record = run_ranks(_run_zero3, 2 * tp, args=(items, str(tmp_path)), timeout_s=180)[0]
    config = load_config(None, items)
    config.model.vocab_size = 257  # the byte tokenizer's
    predicted = predict_rank_memory(config, dp=2)
    assert record["mem_activation_bytes"] == pytest.approx(predicted.activations, rel=0.05)


def test_auto_recomputes_fewer_blocks_as_the_budget_grows(tmp_path: Path, text_corpus: Path, capsys) -> None:
    overrides = _tiny(
        text_corpus,
        **{"model.n_layers": 4, "model.vocab_size": 257, "train.recompute": "full", "train.recompute_layers": "auto"},
    )
    config = load_config(None, [*overrides, "train.memory_budget_gb=1"])
    everything = predict_rank_memory(config, 1, recompute_layers=0).total
    nothing = predict_rank_memory(config, 1, recompute_layers=4).total
    assert nothing < everything
    budgets = [nothing * 0.5, nothing * 1.001, (nothing + everything) / 2, everything * 1.001]
    counts = [choose_recompute_layers(config, 1, 0, budget)[0] for budget in budgets]
    assert counts[0] == 4 and not choose_recompute_layers(config, 1, 0, budgets[0])[2]  # does not fit at all
    assert counts == sorted(counts, reverse=True) and counts[1] == 4 and 0 < counts[2] < 4 and counts[3] == 0
    # the run prints its choice and the reason, and recomputes that many blocks
    gb = budgets[2] / 1e9
    config = load_config(None, [*overrides, f"train.memory_budget_gb={gb}"])
    trainer = Trainer(config, tmp_path)
    assert trainer.model.recompute.count == counts[2]
    trainer.run()
    out = capsys.readouterr().out
    assert f"recompute_layers = auto on pp rank 0: {counts[2]} block(s) per chunk" in out
    assert (
        read_metrics(tmp_path)[-1]["mem_activation_bytes"]
        < predict_rank_memory(config, 1, recompute_layers=0).activations
    )
