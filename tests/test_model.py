"""The transformer: learning, layout-independent init, parameter formula, generation."""

from __future__ import annotations

import pytest
import torch

from loom.config import load_config
from loom.model.init import ROW_BLOCK, normal_slice
from loom.model.transformer import Transformer
from loom.plan.model import count_parameters
from loom.train.generate import generate

SMALL = [
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=4",
    "model.max_seq_len=32",
    "model.vocab_size=50",
    "train.seq_len=32",
]


def small_config(*extra: str):
    return load_config(None, [*SMALL, *extra]).model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_overfits_a_fixed_batch(family: str) -> None:
    torch.manual_seed(0)
    extra = ["model.n_kv_heads=2"] if family == "llama" else []
    model = Transformer(small_config(f"model.family={family}", *extra), seed=1)
    x = torch.randint(0, 50, (4, 16))
    y = torch.randint(0, 50, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = model.loss(x, y).item()
    for _ in range(150):
        loss = model.loss(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert first > 3.0
    assert loss.item() < 0.05


def test_normal_slice_is_a_slice_of_the_full_tensor() -> None:
    shape = (3 * ROW_BLOCK + 17, 40)
    full = normal_slice(7, "w", shape, 0.02)
    assert full.shape == shape
    rows = slice(ROW_BLOCK - 5, 2 * ROW_BLOCK + 9)  # straddles block edges
    torch.testing.assert_close(normal_slice(7, "w", shape, 0.02, rows=rows), full[rows], rtol=0, atol=0)
    cols = slice(10, 30)
    torch.testing.assert_close(normal_slice(7, "w", shape, 0.02, cols=cols), full[:, cols], rtol=0, atol=0)
    assert not torch.equal(normal_slice(8, "w", shape, 0.02), full)  # another seed, other values
    assert not torch.equal(normal_slice(7, "v", shape, 0.02), full)  # another name, other values
    assert abs(full.std().item() - 0.02) < 0.002


def test_init_depends_only_on_seed_and_names() -> None:
    cfg = small_config()
    a, b, c = Transformer(cfg, seed=3), Transformer(cfg, seed=3), Transformer(cfg, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    # a deeper model shares its first layers' values: names are global, not positional
    deeper = Transformer(small_config("model.n_layers=3"), seed=3)
    assert torch.equal(deeper.blocks["1"].mlp.up_proj.weight, a.blocks["1"].mlp.up_proj.weight)
    # the residual projections are scaled by 1/sqrt(2 * n_layers)
    assert deeper.blocks["0"].attn.o_proj.weight.std() < deeper.blocks["0"].attn.q_proj.weight.std()


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["model.family=llama"],
        ["model.family=llama", "model.n_kv_heads=2"],
        ["model.family=llama", "model.tie_embeddings=true"],
        ["model.tie_embeddings=false", "model.bias=false"],
    ],
)
def test_parameter_formula_matches_the_model(extra: list[str]) -> None:
    cfg = small_config(*extra)
    assert count_parameters(cfg) == Transformer(cfg).num_params()


def test_dropout_only_in_training() -> None:
    model = Transformer(small_config("model.dropout=0.5"), seed=0)
    x = torch.randint(0, 50, (2, 8))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_generation_is_seeded() -> None:
    model = Transformer(small_config(), seed=0)
    one = generate(model, [1, 2, 3], 20, max_seq_len=32, temperature=1.0, top_k=10, seed=5)
    two = generate(model, [1, 2, 3], 20, max_seq_len=32, temperature=1.0, top_k=10, seed=5)
    assert one == two and len(one) == 20
    greedy = generate(model, [1, 2, 3], 40, max_seq_len=32, temperature=0)  # longer than the context
    assert len(greedy) == 40 and all(0 <= t < 50 for t in greedy)


def test_generate_refuses_a_pipeline_stage() -> None:
    cfg = load_config(None, ["model.vocab_size=64", "model.d_model=32", "model.n_heads=4", "model.n_layers=2"]).model
    first_stage = Transformer(cfg, seed=0, layers=[0], head=False)  # its output is hidden states, not logits
    with pytest.raises(ValueError, match="pipeline stage"):
        generate(first_stage, [1, 2], 3, 64)
