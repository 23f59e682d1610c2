"""The planner's analytic models reproduce the papers' published figures."""

from __future__ import annotations

import pytest

from loom.plan.flops import (
    GPTShape,
    executed_flops,
    hardware_flops,
    megatron_eq3_flops,
    megatron_parameters,
    model_flops,
    utilisation,
)

A100_BF16 = 312e12

# Narayanan et al. 2021, Table 1: (billions of parameters, heads, hidden, layers); V = 51200, s = 2048
MEGATRON_TABLE_1 = [
    (1.7, 24, 2304, 24),
    (3.6, 32, 3072, 30),
    (7.5, 32, 4096, 36),
    (18.4, 48, 6144, 40),
    (39.1, 64, 8192, 48),
    (76.1, 80, 10240, 60),
    (145.6, 96, 12288, 80),
    (310.1, 128, 16384, 96),
    (529.6, 128, 20480, 105),
    (1008.0, 160, 25600, 128),
]


@pytest.mark.parametrize(("billions", "heads", "hidden", "layers"), MEGATRON_TABLE_1)
def test_eq2_gives_megatron_table_1_parameter_counts(billions: float, heads: int, hidden: int, layers: int) -> None:
    assert megatron_parameters(GPTShape(layers, hidden, 51200, 2048)) / 1e9 == pytest.approx(billions, abs=0.06)


def test_eq3_is_model_flops_plus_a_recomputed_forward_of_every_layer() -> None:
    shape = GPTShape(96, 12288, 51200, 2048)
    assert hardware_flops(shape, 64, "full") == pytest.approx(megatron_eq3_flops(shape, 64), rel=1e-12)
    assert hardware_flops(shape, 64, "none") == model_flops(shape, 64)
    # one layer of 96 fully recomputed adds 1/96 of the difference
    delta = hardware_flops(shape, 64, "full") - model_flops(shape, 64)
    assert hardware_flops(shape, 64, "full", 1) - model_flops(shape, 64) == pytest.approx(delta / 96)


# Korthikanti et al. 2022, Table 5 (A100s, tp 8, micro-batch 1, sequence parallelism + selective
# recomputation): (layers, hidden, GPUs = global batch, seconds per iteration, MFU %, HFU %)
KORTHIKANTI_TABLE_5 = {
    "175B": (96, 12288, 64, 13.75, 51.4, 52.8),
    "530B": (105, 20480, 280, 37.83, 56.0, 57.0),
    "1T": (128, 25600, 512, 71.49, 56.3, 57.0),
}


@pytest.mark.parametrize("model", list(KORTHIKANTI_TABLE_5))
def test_mfu_and_hfu_of_korthikanti_table_5(model: str) -> None:
    layers, hidden, gpus, seconds, mfu, hfu = KORTHIKANTI_TABLE_5[model]
    shape = GPTShape(layers, hidden, 51200, 2048)
    got_mfu = utilisation(model_flops(shape, gpus), seconds, gpus, A100_BF16)
    got_hfu = utilisation(hardware_flops(shape, gpus, "selective"), seconds, gpus, A100_BF16)
    assert 100 * got_mfu == pytest.approx(mfu, abs=0.15)
    assert 100 * got_hfu == pytest.approx(hfu, abs=0.15)


@pytest.mark.parametrize(
    "family,kv", [("gpt2", None), ("llama", 2), ("llama", 1)], ids=["gpt2", "llama kv2", "llama kv1"]
)
def test_rank_parameter_counts_equal_the_built_shards(family: str, kv: int | None) -> None:
    from types import SimpleNamespace

    from loom.config import load_config
    from loom.model.transformer import Transformer
    from loom.parallel.pipeline.partition import rank_stages
    from loom.parallel.tensor import TensorParallel
    from loom.plan.model import count_parameters, count_rank_parameters

    items = [f'model.family="{family}"', "model.vocab_size=257", "model.n_layers=4"]
    cfg = load_config(None, items + ([f"model.n_kv_heads={kv}"] if kv else [])).model
    assert count_rank_parameters(cfg) == count_parameters(cfg)
    for t, pp, vp in [(1, 2, 1), (2, 1, 1), (4, 2, 1), (2, 2, 2)]:
        for tp_rank in range(t):
            for pp_rank in range(pp):
                plans = rank_stages(cfg.n_layers, pp, vp, pp_rank)
                tp = TensorParallel(SimpleNamespace(size=t, rank=tp_rank, name="tp"), t > 1)
                model = Transformer(
                    cfg,
                    device="meta",
                    tp=tp,
                    layers=sorted(i for plan in plans for i in plan.layers),
                    embed=any(plan.embed for plan in plans),
                    head=any(plan.head for plan in plans),
                )
                assert count_rank_parameters(cfg, t, pp, vp, pp_rank) == model.num_params(), (t, pp, vp, pp_rank)


def test_executed_flops_count_what_loom_recomputes() -> None:
    """The step time's FLOPs: a full recomputation runs the layer's forward again (as HFU counts);
    a selective one runs QK^T again in loom's dropout core (which recomputes only its
    probabilities), QK^T and the product with V in a checkpointed core; HFU keeps Korthikanti's."""
    shape = GPTShape(layers=4, hidden=256, vocab=1000, seq=128, attention_density=0.75)
    b, s, h, n = 8, 128, 256, 4
    base = model_flops(shape, b)
    qk = 2 * 0.75 * b * s**2 * h
    assert executed_flops(shape, b, "none") == base
    assert executed_flops(shape, b, "full", "dropout") == hardware_flops(shape, b, "full")
    assert executed_flops(shape, b, "selective", "dropout") == pytest.approx(base + n * qk)
    assert executed_flops(shape, b, "selective", "flash") == pytest.approx(base + n * 2 * qk)
    assert executed_flops(shape, b, "selective", "dropout", recomputed_layers=1) == pytest.approx(base + qk)
    assert hardware_flops(shape, b, "selective") == pytest.approx(base + n * 12 * 0.75 * b * s**2 * h)
