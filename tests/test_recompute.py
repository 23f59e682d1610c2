"""Activation recomputation (``train.recompute``): the same losses, gradients and weights as
keeping every activation, on one process and composed with tp + sp, pipelines (1F1B and
zero-bubble), DDP and ZeRO-3, with dropout on (recomputed masks must equal the first pass).

Recomputation changes no arithmetic (the same ops on the same inputs, in the same order),
so each policy must reproduce ``none`` on the same layout bit for bit; the tolerance below
is only that of float comparison. ``none`` itself is held to the single process by the
parity tests of each parallelism.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from loom.config import load_config
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.errors import LoomError
from loom.model.recompute import Recompute
from loom.model.transformer import Transformer
from loom.parallel.random import ParallelRNG
from loom.train.checkpoint import load_checkpoint
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

POLICIES = {
    "none": {},
    "full": {"train.recompute": "full"},
    "selective": {"train.recompute": "selective"},
    "full, first block of each chunk": {"train.recompute": "full", "train.recompute_layers": 1},
}
LAYOUTS_2 = {
    "tp2 sp": {"parallel.tp": 2, "parallel.sequence_parallel": True, "model.family": "llama"},
    "pp2 1f1b": {"parallel.pp": 2},
    "pp2 zero_bubble tp-free": {"parallel.pp": 2, "parallel.schedule": "zero_bubble"},
    "pp2 interleaved vp2": {"parallel.pp": 2, "parallel.vp": 2, "parallel.schedule": "interleaved_1f1b"},
    "dp2 zero3": {"zero.stage": 3},
    "dp2 zero2 offload": {"zero.stage": 2, "zero.offload": "optimizer"},
    "dp2 ddp": {},
}


def _overrides(corpus: Path, layout: dict, policy: dict) -> list[str]:
    extra = {
        "model.n_layers": 4,
        "model.dropout": 0.1,
        "train.steps": 3,
        "train.global_batch": 8,
        "train.micro_batch": 2,
        "train.eval_every": 0,
        "train.ckpt_every": 0,
        "parallel.timeout_s": 60,
        **layout,
        **policy,
    }
    return tiny_overrides(corpus, **extra)


def _train(runs: dict[str, list[str]], root: str) -> dict:
    out = {}
    for name, overrides in runs.items():
        config = load_config(None, overrides)
        ctx = init_distributed(config.parallel)
        run_dir = Path(root) / name.replace(" ", "_").replace(",", "")
        Trainer(config, run_dir, dist=ctx).run()
        if ctx.is_main:
            checkpoint = load_checkpoint(sorted((run_dir / "checkpoints").glob("step_*"))[-1])
            out[name] = {"metrics": read_metrics(run_dir), "params": checkpoint.model_state}
    return out


def _same(name: str, got: dict, want: dict) -> None:
    for a, b in zip(got["metrics"], want["metrics"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-7, abs=0), name
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-7, abs=0), name
    for param, value in want["params"].items():
        torch.testing.assert_close(got["params"][param], value, rtol=1e-7, atol=0, msg=f"{name}: {param}")


def test_policies_equal_keeping_everything_in_every_layout(tmp_path: Path, text_corpus: Path) -> None:
    runs = {
        f"{layout} / {policy}": _overrides(text_corpus, LAYOUTS_2[layout], POLICIES[policy])
        for layout in LAYOUTS_2
        for policy in POLICIES
    }
    results = run_ranks(_train, 2, args=(runs, str(tmp_path)), timeout_s=400)[0]
    for layout in LAYOUTS_2:
        want = results[f"{layout} / none"]
        for policy in POLICIES:
            _same(f"{layout} / {policy}", results[f"{layout} / {policy}"], want)
        # and each did recompute: what it kept for backward (rank 0, last step) shrank
        kept = {policy: results[f"{layout} / {policy}"]["metrics"][-1]["mem_activation_bytes"] for policy in POLICIES}
        assert kept["full"] <= kept["full, first block of each chunk"] < kept["none"], layout  # vp2: 1 block a chunk
        assert kept["full"] < kept["selective"] < kept["none"], layout


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_process_policies_are_bit_identical_with_dropout(family: str) -> None:
    cfg = load_config(
        None,
        [
            f'model.family="{family}"',
            "model.n_layers=3",
            "model.d_model=32",
            "model.n_heads=4",
            "model.dropout=0.2",
            "model.vocab_size=50",
            "model.max_seq_len=16",
            "train.seq_len=16",
        ],
    ).model
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (2, 16), generator=gen), torch.randint(0, 50, (2, 16), generator=gen)
    results = {}
    for policy, count in [("none", None), ("full", None), ("selective", None), ("full", 2), ("selective", 1)]:
        rng = ParallelRNG(torch.device("cpu"))
        model = Transformer(cfg, seed=1, rng=rng, recompute=Recompute(policy, count))
        rng.reseed(5, 0)
        loss = model.loss(x, y)
        loss.backward()
        results[(policy, count)] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    loss, grads = results[("none", None)]
    for key, (other_loss, other_grads) in results.items():
        assert other_loss == loss, key
        for name, grad in grads.items():
            assert torch.equal(other_grads[name], grad), (key, name)


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["train.recompute=all"], "train.recompute = 'all'"),
        (["train.recompute_layers=2"], 'train.recompute = "full" or "selective"'),
        (['train.recompute="full"', "train.recompute_layers=-1"], "must not be negative"),
        (['train.recompute="full"', 'train.recompute_layers="some"'], "neither a number"),
        (['train.recompute="full"', 'train.recompute_layers="auto"'], "train.memory_budget_gb"),
        (['train.recompute="full"', "train.recompute_layers=3", "parallel.pp=2"], "at most 2 blocks"),
    ],
)
def test_bad_recompute_settings_name_the_field_and_the_fix(items: list[str], match: str) -> None:
    with pytest.raises(LoomError, match=match):
        load_config(None, ["model.n_layers=4", *items])
