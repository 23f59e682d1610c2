"""Every invalid config is caught before any process starts, with one clear paragraph.

The cases are generated (a wrong type for every field of every section, a misspelt key per
field with its "did you mean") and listed by hand (values out of range, batch arithmetic,
layouts the world cannot hold, features that cannot combine, over-long values). Each must
raise a :class:`LoomError` from what ``loom train --nproc N`` runs before it launches
(``loom.config.check_launch``): one problem line naming the field, then a fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from loom.config import Config, check_launch, load_config
from loom.errors import LoomError
from loom.sparsity import SparsityConfig

SECTIONS = typing.get_type_hints(Config)


def _wrong_value(hint: object) -> object:
    """A value of the wrong type for a field typed ``hint``."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if bool in allowed:
        return "yes"
    if str in allowed:
        return 7
    if int in allowed or float in allowed:
        return "many"
    return 3  # a list


def _fields(cls: type, prefix: str) -> list[tuple[str, object]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _fields(hints[f.name], f"{prefix}.{f.name}")
        else:
            out.append((f"{prefix}.{f.name}", hints[f.name]))
    return out


ALL_FIELDS = [item for section, cls in SECTIONS.items() for item in _fields(cls, section)]
SPARSE = ["model.attention=sparse"]

TYPE_CASES = [([f"{name}={_wrong_value(hint)!r}".replace("'", '"')], name) for name, hint in ALL_FIELDS]


def _misspelt(name: str) -> str:
    section, _, key = name.rpartition(".")
    return f"{section}.{key[:-1] + key[-1] * 2}" if len(key) > 3 else f"{section}.{key}x"


MISSPELT_CASES = [
    ([f"{_misspelt(name)}=1"], f"did you mean {name}")
    for name, _ in ALL_FIELDS
    if not name.startswith("model.sparse_attention") and "." in name
][:40]

# (overrides, world size, what the message must name)
HAND_CASES: list[tuple[list[str], int, str]] = [
    # out of range
    (["model.n_layers=0"], 1, "model.n_layers"),
    (["model.d_model=-8"], 1, "model.d_model"),
    (["model.n_heads=0"], 1, "model.n_heads"),
    (["model.d_model=100", "model.n_heads=3"], 1, "model.d_model"),
    (['model.family="llama"', "model.d_model=12", "model.n_heads=4"], 1, "model.d_model / model.n_heads"),
    (['model.family="llama"', "model.n_heads=4", "model.n_kv_heads=3"], 1, "model.n_kv_heads"),
    (["model.n_kv_heads=2"], 1, "model.n_kv_heads"),
    (["model.dropout=1.0"], 1, "model.dropout"),
    (["model.dropout=-0.1"], 1, "model.dropout"),
    (["model.norm_eps=0"], 1, "model.norm_eps"),
    (["model.vocab_size=0"], 1, "model.vocab_size"),
    (["model.d_ff=0"], 1, "model.d_ff"),
    (['model.family="bert"'], 1, "model.family"),
    (['model.preset="gpt5"'], 1, "model.preset"),
    (['model.rope_scaling="llama3"'], 1, "model.rope_scaling"),
    (['model.family="llama"', 'model.rope_scaling="llama3"', "model.rope_factor=0.5"], 1, "model.rope_factor"),
    (['model.attention="flash"'], 1, "model.attention"),
    (["model.top_k=0"], 1, "model.top_k"),
    (["model.lsh_buckets=3"], 1, "model.lsh_buckets"),
    (["model.init_std=0"], 1, "model.init_std"),
    ([*SPARSE, 'model.sparse_attention.mode="diagonal"'], 1, "mode"),
    ([*SPARSE, "model.sparse_attention.block=0"], 1, "block"),
    ([*SPARSE, 'model.sparse_attention.attention="bidirectional"'], 1, "model.sparse_attention.attention"),
    ([*SPARSE, "model.sparse_attention.block=48"], 1, "block"),
    (["train.steps=0"], 1, "train.steps"),
    (["train.lr=0"], 1, "train.lr"),
    (["train.lr=-1e-3"], 1, "train.lr"),
    (["train.min_lr_ratio=2"], 1, "train.min_lr_ratio"),
    (["train.beta1=1.0"], 1, "train.beta1"),
    (["train.beta2=-0.5"], 1, "train.beta2"),
    (["train.eps=0"], 1, "train.eps"),
    (["train.weight_decay=-0.1"], 1, "train.weight_decay"),
    (["train.grad_clip=-1"], 1, "train.grad_clip"),
    (['train.precision="fp8"'], 1, "train.precision"),
    (["train.seq_len=0"], 1, "train.seq_len"),
    (["train.seq_len=4096"], 1, "train.seq_len"),
    (["train.keep_ckpts=0"], 1, "train.keep_ckpts"),
    (["train.max_bad_steps=0"], 1, "train.max_bad_steps"),
    (["train.warmup_steps=-1"], 1, "train.warmup_steps"),
    (['train.recompute="some"'], 1, "train.recompute"),
    (['train.device="tpu"'], 1, "train.device"),
    (['data.corpus=""'], 1, "data.corpus"),
    (["data.val_fraction=0.9"], 1, "data.val_fraction"),
    (["data.max_bytes=-1"], 1, "data.max_bytes"),
    (["parallel.tp=0"], 1, "parallel.tp"),
    (['parallel.schedule="2f2b"'], 1, "parallel.schedule"),
    (["parallel.vp=2"], 1, "parallel.vp"),
    (["parallel.timeout_s=0"], 1, "parallel.timeout_s"),
    (['parallel.backend="mpi"'], 1, "parallel.backend"),
    (["ddp.bucket_mb=0"], 1, "ddp.bucket_mb"),
    (['ddp.transport="rdma"'], 1, "ddp.transport"),
    (["zero.stage=4"], 1, "zero.stage"),
    (['zero.offload="nvme"'], 1, "zero.offload"),
    (['zero.offload="optimizer"'], 1, "zero.offload"),
    (["zero.stage=2", 'zero.grad_dtype="bf16"'], 1, "zero.grad_dtype"),
    (['optim.name="lion"'], 1, "optim.name"),
    (['optim.name="onebit_adam"', "optim.freeze_step=0"], 1, "optim.freeze_step"),
    (['optim.name="zero_one_adam"', "optim.var_update_scaler=0"], 1, "optim.var_update_scaler"),
    (['optim.name="zero_one_adam"', "optim.freeze_step=10"], 1, "optim.freeze_step"),
    (["optim.local_step_clipper=4"], 1, "optim.local_step_clipper"),
    # batch arithmetic
    (["train.global_batch=10", "train.micro_batch=4"], 1, "train.global_batch"),
    (["train.global_batch=8", "train.micro_batch=4"], 4, "train.global_batch"),
    (["train.micro_batch=0"], 1, "train.micro_batch"),
    (["train.global_batch=-8"], 1, "train.global_batch"),
    # layouts the world cannot hold
    (["parallel.tp=3"], 4, "parallel.tp"),
    (["parallel.pp=3"], 4, "parallel.pp"),
    (["parallel.dp=3"], 4, "parallel.dp"),
    (["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"], 4, "parallel"),
    (["parallel.tp=8"], 8, "parallel.tp"),
    (["parallel.pp=8"], 8, "parallel.pp"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["parallel.pp=2", "parallel.vp=2", 'parallel.schedule="interleaved_1f1b"', "model.n_layers=6"], 2, "n_layers"),
    # features that cannot combine
    (["zero.stage=3", 'parallel.schedule="zero_bubble"'], 1, "zero.stage"),
    (["zero.stage=3", "parallel.vp=2", 'parallel.schedule="interleaved_1f1b"'], 1, "zero.stage"),
    (['optim.name="onebit_adam"', "zero.stage=3"], 2, "zero.stage"),
    (['optim.name="zero_one_adam"', "zero.stage=2"], 2, "zero.stage"),
    (["model.reversible=true", "parallel.pp=2"], 2, "model.reversible"),
    # unknown sections and keys, over-long values
    (["trian.lr=1e-3"], 1, "did you mean train"),
    (["train.learning_rate=1e-3"], 1, "train.learning_rate"),
    (['data.corpus="' + "x" * 5000 + '"'], 1, "data.corpus"),
    (['train.sample_prompt="' + "y" * 100_000 + '"'], 1, "train.sample_prompt"),
]


def _check(items: list[str], world: int) -> LoomError:
    with pytest.raises(LoomError) as caught:
        check_launch(load_config(None, items), world)
    return caught.value


def _one_paragraph(error: LoomError, name: str) -> None:
    text = str(error)
    assert name in error.problem, text
    assert "\n" not in error.problem and error.fix, text  # one problem line, then the fix
    assert len(error.problem) < 600, text  # a long value is named, not echoed whole


def test_there_are_over_a_hundred_cases() -> None:
    assert len(TYPE_CASES) + len(MISSPELT_CASES) + len(HAND_CASES) >= 100


@pytest.mark.parametrize(("items", "name"), TYPE_CASES, ids=[name for _, name in TYPE_CASES])
def test_a_value_of_the_wrong_type_is_named(items: list[str], name: str) -> None:
    _one_paragraph(_check(items, 1), name)


@pytest.mark.parametrize(("items", "hint"), MISSPELT_CASES, ids=[i[0] for i, _ in MISSPELT_CASES])
def test_a_misspelt_key_gets_a_did_you_mean(items: list[str], hint: str) -> None:
    error = _check(items, 1)
    assert hint in error.fix, str(error)


@pytest.mark.parametrize(("items", "world", "name"), HAND_CASES, ids=[" ".join(c[0])[:60] for c in HAND_CASES])
def test_an_invalid_value_layout_or_combination_is_caught_before_launch(
    items: list[str], world: int, name: str
) -> None:
    error = _check(items, world)
    assert name in str(error), str(error)
    assert "\n" not in error.problem and len(error.problem) < 600 and error.fix, str(error)


def test_the_sparsity_fields_are_in_the_sweep() -> None:
    names = {name for name, _ in ALL_FIELDS}
    assert {f"model.sparse_attention.{f.name}" for f in dataclasses.fields(SparsityConfig)} <= names
