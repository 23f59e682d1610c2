"""ZeRO selected from the trainer (``zero.stage``): parity with the single process, alone and
composed with tensor and pipeline parallelism, offload, memory and traffic in the metrics,
checkpoints that cross between ZeRO and plain layouts, and config errors.

Every layout trains several optimizer steps with gradient accumulation and must give the
plain single-process run's per-step loss and gradient norm (rel 1e-5) and, in its final
checkpoint (full tensors, stages merged), its parameters. Parameters get the tolerance of
the other parity tests (rtol 1e-4, atol 1e-5), not 1e-5 relative: Adam divides by
sqrt(v), so where a gradient is near zero (the attention key bias's exact gradient is
zero) the round-off of a differently ordered sum moves the update by up to lr times its
relative error (see test_zero.py).

One spawn per world size runs every layout of that size (a rank costs seconds to start).
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
from loom.plan.memory import dp_bytes_per_step, zero_memory_bytes
from loom.train.checkpoint import load_checkpoint
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

ACCUM = 2  # micro-batches per dp rank and step: global batch 8 = micro 2 x accum 2 x dp 2
LLAMA_KV1 = {"model.family": "llama", "model.n_kv_heads": 1}  # tp=2 > one KV head: replicated
LAYOUTS_2 = {  # dp = 2, two micro-batches of 2 per rank and step; checkpoints at steps 2 and 4
    "zero1": {"zero.stage": 1},
    "zero2": {"zero.stage": 2},
    "zero3": {"zero.stage": 3},
    "zero2 offload": {"zero.stage": 2, "zero.offload": "optimizer"},
}
LAYOUTS_4 = {  # dp = 2 x (tp = 2 or pp = 2), or dp = 4
    "zero1 tp2 sp": {"zero.stage": 1, "parallel.tp": 2, "parallel.sequence_parallel": True},
    "zero2 llama kv1 tp2 sp": {**LLAMA_KV1, "zero.stage": 2, "parallel.tp": 2, "parallel.sequence_parallel": True},
    "zero3 llama kv1 tp2": {**LLAMA_KV1, "zero.stage": 3, "parallel.tp": 2},
    "zero1 pp2 1f1b": {"zero.stage": 1, "parallel.pp": 2},
    "zero2 pp2 zero_bubble": {"zero.stage": 2, "parallel.pp": 2, "parallel.schedule": "zero_bubble"},
    "zero3 pp2 1f1b": {"zero.stage": 3, "parallel.pp": 2},
    "zero2 pp2 gpipe": {"zero.stage": 2, "parallel.pp": 2, "parallel.schedule": "gpipe"},
    "zero3 pp2 gpipe": {"zero.stage": 3, "parallel.pp": 2, "parallel.schedule": "gpipe"},
    "zero2 pp2 interleaved": {
        "model.n_layers": 4,
        "zero.stage": 2,
        "parallel.pp": 2,
        "parallel.vp": 2,
        "parallel.schedule": "interleaved_1f1b",
    },
    "zero3 dp4 offload": {"zero.stage": 3, "zero.offload": "optimizer"},
    # 16-bit: the loss scale agrees over dp, tp and pp; activations cross stages in bf16
    "zero3 tp2 sp fp16": {
        "zero.stage": 3,
        "parallel.tp": 2,
        "parallel.sequence_parallel": True,
        "train.precision": "fp16",
    },
    "zero2 pp2 bf16 grads fp32": {
        "zero.stage": 2,
        "parallel.pp": 2,
        "train.precision": "bf16",
        "zero.grad_dtype": "fp32",
    },
}


def overrides(corpus: Path, extra: dict, steps: int) -> list[str]:
    common = {
        "train.steps": steps,
        "train.global_batch": 8,
        "train.micro_batch": 2,
        "train.eval_every": 0,
        "train.ckpt_every": 2,
        "parallel.timeout_s": 60,
    }
    return tiny_overrides(corpus, **{**common, **extra})


def _train_layouts(layouts: dict[str, list[str]], root: str, resume: dict[str, str]) -> dict:
    out = {}
    for name, items in layouts.items():
        config = load_config(None, items)
        ctx = init_distributed(config.parallel)
        Trainer(config, Path(root) / name, resume_from=Path(resume[name]) if name in resume else None, dist=ctx).run()
        out[name] = read_metrics(Path(root) / name) if ctx.is_main else None
    return out


def single(corpus: Path, root: Path, extra: dict, steps: int, resume: Path | None = None) -> list[dict]:
    """The plain single-process run (no ZeRO, no split) of the same model."""
    model_only = {k: v for k, v in extra.items() if k.startswith("model.")}
    Trainer(
        load_config(None, overrides(corpus, model_only, steps)), root, resume_from=resume, live_progress=False
    ).run()
    return read_metrics(root)


def assert_same_run(name: str, got: list[dict], want: list[dict], got_dir: Path, want_dir: Path) -> None:
    for a, b in zip(got, want, strict=True):
        assert a["step"] == b["step"], name
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), name
    assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], rel=1e-5), name
    mine, theirs = load_checkpoint(got_dir).model_state, load_checkpoint(want_dir).model_state
    assert mine.keys() == theirs.keys(), name
    for param, value in theirs.items():
        assert mine[param].dtype == torch.float32, name  # master weights, whatever the compute dtype
        torch.testing.assert_close(mine[param], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {param}")


# ----------------------------------------------------------------------------- dp = 2


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Stages 1-3 and offload on dp = 2, plus checkpoints crossing between ZeRO and plain runs."""
    root = tmp_path_factory.mktemp("zero2ranks")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):  # the text_corpus fixture's documents (that fixture is function-scoped)
        (corpus / f"doc{i:02d}.txt").write_text(
            "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40)), encoding="utf-8"
        )
    want = single(corpus, root / "one", {}, steps=4)
    layouts = {name: overrides(corpus, extra, steps=4) for name, extra in LAYOUTS_2.items()}
    # a plain single-process checkpoint resumed under ZeRO-3 on two ranks
    layouts["zero3 from plain"] = overrides(corpus, {"zero.stage": 3}, steps=4)
    resume = {"zero3 from plain": str(root / "one" / "checkpoints" / "step_000002")}
    got = run_ranks(_train_layouts, 2, args=(layouts, str(root / "runs"), resume), timeout_s=180)[0]
    # ... and a ZeRO-2 checkpoint resumed by the plain single process
    back = single(corpus, root / "back", {}, steps=4, resume=root / "runs" / "zero2" / "checkpoints" / "step_000002")
    return {"root": root, "want": want, "got": got, "back": back}


@pytest.mark.parametrize("name", list(LAYOUTS_2))
def test_stages_match_the_single_process(two_ranks: dict, name: str) -> None:
    root = two_ranks["root"]
    assert_same_run(name, two_ranks["got"][name], two_ranks["want"], root / "runs" / name, root / "one")


def test_offload_equals_the_device_run(two_ranks: dict) -> None:
    offloaded, plain = two_ranks["got"]["zero2 offload"], two_ranks["got"]["zero2"]
    assert [r["loss"] for r in offloaded] == [r["loss"] for r in plain]
    root = two_ranks["root"] / "runs"
    mine, theirs = (load_checkpoint(root / name).model_state for name in ("zero2 offload", "zero2"))
    assert all(torch.equal(mine[n], theirs[n]) for n in theirs)


def test_checkpoints_cross_between_zero_and_plain_layouts(two_ranks: dict) -> None:
    want = two_ranks["want"][2:]
    for name, got in (
        ("zero3 from plain", two_ranks["got"]["zero3 from plain"]),
        ("plain from zero2", two_ranks["back"]),
    ):
        assert [r["step"] for r in got] == [3, 4], name
        for a, b in zip(got, want, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), name
    zero2 = load_checkpoint(two_ranks["root"] / "runs" / "zero2" / "checkpoints" / "step_000002").train_state
    plain = load_checkpoint(two_ranks["root"] / "one" / "checkpoints" / "step_000002").train_state
    assert zero2["optimizer"]["state"].keys() == plain["optimizer"]["state"].keys()
    for name, entry in plain["optimizer"]["state"].items():
        assert zero2["optimizer"]["state"][name].keys() == entry.keys()
        assert int(zero2["optimizer"]["state"][name]["step"]) == int(entry["step"]) == 2


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_metrics_hold_memory_and_traffic_of_the_formulas(two_ranks: dict, stage: int) -> None:
    records = two_ranks["got"][f"zero{stage}"]
    psi = sum(t.numel() for t in load_checkpoint(two_ranks["root"] / "one").model_state.values())
    # fp32 parameters and gradients (4 bytes each), the parameters their own master: K = 8;
    # padding is whole where a buffer is full size, half where it is a slice of two
    pad_bytes_per_elem = (4 if stage < 3 else 2) + (4 if stage < 2 else 2) + 4
    for record in records:
        measured = record["mem_params_bytes"] + record["mem_grads_bytes"] + record["mem_optim_bytes"]
        assert (
            measured == zero_memory_bytes(stage, psi, 2, param_bytes=4, grad_bytes=4, k=8) + record["mem_padding_bytes"]
        )
        padded = psi + round(record["mem_padding_bytes"] / pad_bytes_per_elem)
        # 2Ψ or 3Ψ (ring), plus the loss and the norm's squares (4 bytes each); ZeRO-3 gathers
        # the parameters for each micro-batch's forward and backward: 2Ψ more per extra one
        regather = 2 * (ACCUM - 1) * padded * 4 // 2 if stage == 3 else 0
        want = dp_bytes_per_step(stage, padded, 2, param_bytes=4, grad_bytes=4) + regather + 8
        assert record["comm_bytes_dp"] == want
    assert records[0]["mem_optim_bytes"] * 2 == pytest.approx(8 * psi, rel=1e-3)  # sharded moments


# ----------------------------------------------------------------------------- dp = 2 x (tp | pp) = 4 ranks


def test_zero_with_tp_and_pp_matches_the_single_process(tmp_path: Path, text_corpus: Path) -> None:
    layouts = {name: overrides(text_corpus, extra, steps=3) for name, extra in LAYOUTS_4.items()}
    got = run_ranks(_train_layouts, 4, args=(layouts, str(tmp_path / "runs"), {}), timeout_s=300)[0]
    references = {}
    for name, extra in LAYOUTS_4.items():
        family = " ".join(f"{k}={v}" for k, v in sorted(extra.items()) if k.startswith("model.")) or "gpt2"
        if family not in references:
            references[family] = single(text_corpus, tmp_path / family, extra, steps=3)
        if extra.get("train.precision") == "bf16":  # close to the fp32 run, not equal
            for a, b in zip(got[name], references[family], strict=True):
                assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), name
            continue
        if extra.get("train.precision") == "fp16":
            # the first scale (2^16) overflows: every rank skips that step (else the ranks'
            # weights would part and the checkpoint gather would not add up), then it trains
            assert [bool(r.get("skipped")) for r in got[name]] == [True, False, False], name
            assert got[name][0]["loss"] == pytest.approx(references[family][0]["loss"], rel=1e-2), name
            assert got[name][-1]["loss"] < got[name][0]["loss"] - 0.1, name
            continue
        assert_same_run(name, got[name], references[family], tmp_path / "runs" / name, tmp_path / family)
    assert all(r["mem_grads_bytes"] > 0 for r in got["zero2 pp2 bf16 grads fp32"])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["zero.stage=4"], "zero.stage = 4"),
        (["zero.stage=2", 'zero.offload="cpu"'], "zero.offload = 'cpu'"),
        (['zero.offload="optimizer"'], "zero.stage to 1, 2 or 3"),
        (["zero.stage=1", 'zero.grad_dtype="bf16"'], "zero.grad_dtype = 'bf16' with train.precision = 'fp32'"),
        (["zero.stage=3", "parallel.pp=2", 'parallel.schedule="zero_bubble"'], "zero_bubble"),
        (["zero.stage=3", "parallel.vp=2", 'parallel.schedule="interleaved_1f1b"'], "parallel.vp = 2"),
        (["zero.stages=2"], "did you mean zero.stage"),
    ],
)
def test_bad_zero_settings_name_the_field_and_the_fix(items: list[str], match: str) -> None:
    with pytest.raises(LoomError, match=match) as info:
        load_config(None, items)
    assert info.value.fix


def test_zero_settings_load() -> None:
    config = load_config(
        None, ["zero.stage=3", 'zero.offload="optimizer"', 'train.precision="bf16"', 'zero.grad_dtype="fp32"']
    )
    assert (config.zero.stage, config.zero.offload, config.zero.grad_dtype) == (3, "optimizer", "fp32")
    assert load_config(None, []).zero.stage == 0  # DDP, as before


# ----------------------------------------------------------------------------- starting without the whole model


def _live_tensor_bytes() -> int:
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _start_zero3(corpus: str) -> dict:
    from loom.model.transformer import Transformer

    config = load_config(None, overrides(Path(corpus), {"zero.stage": 3, "model.n_layers": 8, "model.d_model": 64}, 1))
    ctx = init_distributed(config.parallel)
    peaks = []
    real = Transformer.initial_value

    def initial_value(self, name, device="cpu"):  # each parameter materialised: what is alive now
        value = real(self, name, device)
        peaks.append(_live_tensor_bytes())
        return value

    Transformer.initial_value = initial_value
    try:
        trainer = Trainer(config, Path(corpus).parent / f"start{ctx.coords.dp}", dist=ctx)
    finally:
        Transformer.initial_value = real
    whole = 4 * trainer.model.num_params()  # the whole model in fp32
    return {"peaks": peaks, "whole": whole, "params": len(list(trainer.model.parameters()))}


def test_a_zero3_rank_never_holds_the_whole_model_while_it_starts(tmp_path: Path, text_corpus: Path) -> None:
    result = run_ranks(_start_zero3, 2, args=(str(text_corpus),), timeout_s=120)[0]
    assert len(result["peaks"]) == result["params"]  # every parameter was materialised one at a time
    # at any point: the shards built so far (params, moments, gradients: 16 bytes per element / 2
    # ranks at the end) plus one unit in full; never the whole fp32 model beside them
    assert max(result["peaks"]) < result["whole"]
