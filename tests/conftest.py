"""Shared fixtures: a private token cache and a small text corpus for fast training runs; and
``train_rank``, one rank's side of a ``loom train`` run for ``run_ranks``; the sparse layouts the
kernels are checked on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# block-sparse layouts the kernels are checked against dense attention on (blocks of 8, 7 blocks)
SPARSE_LAYOUTS = [
    {"mode": "dense"},
    {"mode": "fixed", "num_local_blocks": 2},
    {"mode": "sliding_window", "num_sliding_window_blocks": 3},
    {"mode": "bigbird", "different_layout_per_head": True, "num_random_blocks": 1, "seed": 3},
    {"mode": "longformer", "num_sliding_window_blocks": 3, "global_block_indices": [0, 5]},
    {"mode": "strided", "num_local_blocks": 2, "stride_blocks": 3},
]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tokenised corpora go to a per-session folder, never the user's ~/.cache/loom."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LOOM_CACHE", str(tmp_path_factory.mktemp("loom-cache")))
    torch.set_num_threads(2)
    yield
    mp.undo()


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A folder of small Python-like documents (~60 kB), enough for several tiny steps."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (folder / f"doc{i:02d}.txt").write_text(body, encoding="utf-8")
    return folder


def tiny_overrides(corpus: Path, **extra: object) -> list[str]:
    """``--set`` items for a 2-layer model that trains in well under a second per step."""
    items = {
        "model.n_layers": 2,
        "model.d_model": 32,
        "model.n_heads": 4,
        "model.max_seq_len": 64,
        "train.seq_len": 32,
        "train.micro_batch": 4,
        "train.steps": 6,
        "train.warmup_steps": 2,
        "train.eval_every": 3,
        "train.eval_batches": 2,
        "train.ckpt_every": 3,
        "train.sample_tokens": 0,
        "data.corpus": str(corpus),
    }
    items.update(extra)
    return [f"{k}={_toml(v)}" for k, v in items.items()]


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def train_rank(items: list[str], run_dir: str, resume: str | None = None) -> list | None:
    """One rank of a run with ``--set`` ``items`` into ``run_dir`` (resumed from the checkpoint
    ``resume``): rank 0 returns the run's metrics records, the others None."""
    from loom.config import load_config
    from loom.distributed.context import init_distributed
    from loom.train.metrics import read_metrics
    from loom.train.trainer import Trainer

    config = load_config(None, items)
    ctx = init_distributed(config.parallel)
    Trainer(config, Path(run_dir), dist=ctx, live_progress=False, resume_from=Path(resume) if resume else None).run()
    out = read_metrics(Path(run_dir)) if ctx.is_main else None
    ctx.shutdown()
    return out


def toy_regression(rank: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """A small regression for optimizer tests on several ranks: this rank's own samples ``x``
    (256 x 16), the shared target function's values, and a builder of the same 577-parameter
    MLP on every call (16 -> 32 tanh -> 1)."""
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own samples
    x = torch.randn(256, 16, generator=data)
    target = torch.sin(x @ torch.randn(16, 1, generator=torch.Generator().manual_seed(0)))

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    return x, target, model
