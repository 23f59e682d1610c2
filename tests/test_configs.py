"""The configs shipped in configs/ resolve, without starting a process, into the layout their
comments promise, and the planner says they fit the devices they are written for."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.config import load_config
from loom.distributed.mesh import ParallelDims
from loom.plan.hardware import HARDWARE
from loom.plan.report import predict_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CASES = {  # file -> (world size, device, (dp, tp, pp), micro-batches per dp rank)
    "demo.toml": (1, "cpu", (1, 1, 1), 1),
    "3d.toml": (8, "cpu", (2, 2, 2), 4),
    "gpt2-124m-8gpu.toml": (8, "h100-sxm", (8, 1, 1), 4),
    "llama-7b-64gpu.toml": (64, "h100-sxm", (32, 2, 1), 32),
    "llama-70b-512gpu.toml": (512, "h100-sxm", (16, 8, 4), 64),
}


def test_every_shipped_config_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.toml")) == sorted(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_shipped_configs_resolve_and_fit(name: str) -> None:
    world, device, (dp, tp, pp), accum = CASES[name]
    config = load_config(CONFIGS / name)
    dims = ParallelDims.resolve(config.parallel, world)
    assert (dims.dp, dims.tp, dims.pp) == (dp, tp, pp)
    assert config.batch(dp=dims.dp).grad_accum == accum
    if config.model.vocab_size is None:
        config.model.vocab_size = 257  # the byte tokenizer's
    hardware = HARDWARE[device]
    prediction = predict_run(config, world, hardware, "cpu" if device == "cpu" else "cuda", pp_rank=None)
    assert prediction.fits, (name, prediction.memory.total / 2**30)
