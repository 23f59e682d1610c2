"""DDP parity: gradients, losses and parameters on 2 and 4 gloo ranks equal the single process.

Also the ledger: per step each rank sends exactly 2(n-1)/n x parameter bytes for gradients
(ring all-reduce), plus the one loss scalar averaged for the metrics.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from loom.config import load_config
from loom.distributed.comm import model_bytes
from loom.distributed.context import BACKSTOP_S, init_distributed
from loom.distributed.spawn import run_ranks
from loom.model.transformer import Transformer
from loom.parallel.ddp import DataParallel
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

MODEL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", "train.seq_len=16"]
GLOBAL_BATCH = 24  # divisible by 2, 3 and 4 ranks, and by 2 micro-batches on each
# Parameters whose exact gradient is zero: a key bias adds q.b to every score of a query's
# row, and softmax ignores a shift shared by the row. Their gradient is rounding noise, which
# Adam (noise / sqrt(noise^2) ~ 1) turns into lr-sized steps of whatever sign the rounding
# takes; a different summation order (the ring's chunking) gives different noise, so they
# are checked to stay within the steps' lr, not against the other run.
NOISE_ONLY = ("attn.k_proj.bias",)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (GLOBAL_BATCH, 16), generator=generator)
    return x, torch.roll(x, -1, dims=1)


def _single_process_grads() -> dict[str, torch.Tensor]:
    model = Transformer(load_config(None, MODEL).model, seed=3)
    model.loss(*_batch()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _rank_grads(bucket_mb: float, accum: int, transport: str = "backend") -> dict:
    """Each rank: its rows of the global batch in ``accum`` micro-batches, then DDP sync."""
    config = load_config(None, MODEL)
    ctx = init_distributed(config.parallel)
    model = Transformer(config.model, seed=3)
    ddp = DataParallel(model, ctx.comm("dp"), bucket_mb=bucket_mb, transport=transport)
    x, y = _batch()
    dp, rank = ctx.dims.dp, ctx.coords.dp
    rows = GLOBAL_BATCH // dp
    micro = rows // accum
    ctx.ledger.take_step_totals()
    for k in range(accum):
        start = rank * rows + k * micro
        with ddp.no_sync() if k < accum - 1 else torch.enable_grad():
            (model.loss(x[start : start + micro], y[start : start + micro]) / accum).backward()
    ddp.finish_gradient_sync()
    return {
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "bytes": ctx.ledger.take_step_totals()["comm_bytes_dp"],
        "param_bytes": ddp.parameter_bytes,
        "buckets": len(ddp.buckets),
        "transport": ddp.transport,
        "grad_is_view": all(p.grad.data_ptr() >= b.buffer.data_ptr() for b in ddp.buckets for p in b.params),
    }


def _check_grads(results: list[dict], n: int) -> None:
    want = _single_process_grads()
    for result in results:
        assert result["grad_is_view"]
        for name, grad in want.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert result["bytes"] == model_bytes("all_reduce", n, result["param_bytes"])
        assert Fraction(result["bytes"]) == Fraction(2 * (n - 1), n) * result["param_bytes"]


@pytest.mark.parametrize("transport", ["backend", "shm"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_gradients_equal_the_single_process(world: int, transport: str) -> None:
    # a tiny bucket cap makes many buckets, so ordering and partial readiness are exercised
    results = run_ranks(_rank_grads, world, args=(0.002, 1, transport), timeout_s=90)
    assert results[0]["buckets"] > 5 and results[0]["transport"] == transport
    _check_grads(results, world)
    if transport == "shm":  # each chunk is summed by one rank: every rank holds the same bits
        for result in results[1:]:
            for name, grad in result["grads"].items():
                assert torch.equal(grad, results[0]["grads"][name]), name


@pytest.mark.parametrize("transport", ["backend", "shm"])
def test_ddp_with_accumulation_syncs_once(transport: str) -> None:
    results = run_ranks(_rank_grads, 2, args=(25.0, 2, transport), timeout_s=90)
    assert results[0]["buckets"] == 1
    _check_grads(results, 2)  # the bytes of one all-reduce: nothing sent inside no_sync


def assert_adam_params_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Parameters after a few AdamW steps: every element within 2e-5, all but 0.1% within rel 1e-5 / abs 1e-6.

    Where an element's gradient is at rounding level, Adam's m / sqrt(v) turns the rounding
    of a different summation order into a step of its own: a rare element drifts by a few
    1e-6 while its neighbours agree to 1e-7.
    """
    diff = (got - want).abs()
    loose = diff > 1e-6 + 1e-5 * want.abs()
    assert diff.max() <= 2e-5, f"{name}: max difference {diff.max():.2e}"
    assert loose.float().mean() <= 1e-3, f"{name}: {int(loose.sum())} of {loose.numel()} elements differ"


def _rank_train(overrides: list[str], run_dir: str) -> list[dict]:
    config = load_config(None, overrides)
    ctx = init_distributed(config.parallel)
    trainer = Trainer(config, Path(run_dir), dist=ctx)
    ddp = trainer.update.ddp
    waits = None if ddp.shm is None else (ddp.shm.timeout_s, ddp.shm.quiesce_timeout_s)
    trainer.run()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return [read_metrics(Path(run_dir)) if ctx.is_main else None, params, ddp.transport, waits]


@pytest.mark.parametrize(
    ("world", "micro", "accum", "transport"), [(2, 2, 2, "auto"), (4, 2, 1, "auto"), (2, 4, 1, "backend")]
)
def test_trainer_on_dp_ranks_matches_one_process(
    tmp_path: Path, text_corpus: Path, world: int, micro: int, accum: int, transport: str
) -> None:
    common = {"train.global_batch": 8, "train.steps": 4, "train.eval_every": 0, "train.ckpt_every": 0}
    single = Trainer(
        load_config(None, tiny_overrides(text_corpus, **common, **{"train.micro_batch": 2})), tmp_path / "one"
    )
    single.run()  # dp=1 x accum 4
    overrides = tiny_overrides(text_corpus, **common, **{"train.micro_batch": micro, "ddp.transport": transport})
    results = run_ranks(_rank_train, world, args=(overrides, str(tmp_path / "dp")), timeout_s=120)
    assert {r[2] for r in results} == {"shm" if transport == "auto" else "backend"}  # one host: auto takes shm
    if transport == "auto":  # the buckets' waits behind the watchdog's; the readers' wait, which it cannot see, at it
        timeout = load_config(None, overrides).parallel.timeout_s
        assert {r[3] for r in results} == {(timeout + BACKSTOP_S, timeout)}
    records = results[0][0]
    param_bytes = 4 * single.model.num_params()
    for one, many in zip(read_metrics(tmp_path / "one"), records, strict=True):
        assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
        # gradients plus the 4-byte loss scalar, both ring all-reduces
        assert many["comm_bytes_dp"] == model_bytes("all_reduce", world, param_bytes) + model_bytes(
            "all_reduce", world, 4
        )
    lr_sum = sum(r["lr"] for r in read_metrics(tmp_path / "one"))
    for name, want in single.model.named_parameters():
        for _, params, *_ in results:
            if name.endswith(NOISE_ONLY):
                # its exact gradient is zero, so both runs step it by lr-sized moves of rounding noise
                assert params[name].abs().max() <= 3 * lr_sum and want.abs().max() <= 3 * lr_sum, name
                continue
            assert_adam_params_close(params[name], want.detach(), name)


def _rank_unused_branch() -> dict:
    """Step 1 uses both linears, step 2 only the first: the second's slot must read zero, not step 1."""
    ctx = init_distributed(load_config(None, []).parallel)
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    model = torch.nn.ModuleList([first, second])
    ddp = DataParallel(model, ctx.comm("dp"), bucket_mb=0.0001)
    x = torch.full((2, 4), float(ctx.coords.dp + 1))
    second(first(x)).sum().backward()
    ddp.finish_gradient_sync()
    step1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    ddp.zero_grad()
    first(x).sum().backward()
    ddp.finish_gradient_sync()
    return {"step1": step1, "step2": {n: p.grad.clone() for n, p in model.named_parameters()}}


def test_unused_parameters_get_zero_not_stale_gradients() -> None:
    results = run_ranks(_rank_unused_branch, 2, timeout_s=60)
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x = torch.cat([torch.full((2, 4), 1.0), torch.full((2, 4), 2.0)])
    (second(first(x)).sum() / 2).backward()  # the mean over the 2 ranks' sums
    first.zero_grad(set_to_none=True)
    (first(x).sum() / 2).backward()
    for result in results:
        assert result["step1"]["1.weight"].abs().sum() > 0
        torch.testing.assert_close(result["step2"]["0.weight"], first.weight.grad)
        torch.testing.assert_close(result["step2"]["0.bias"], first.bias.grad)
        assert torch.equal(result["step2"]["1.weight"], torch.zeros(4, 4))
        assert torch.equal(result["step2"]["1.bias"], torch.zeros(4))


def _rank_scaled_loss() -> dict:
    config = load_config(None, MODEL)
    ctx = init_distributed(config.parallel)
    model = Transformer(config.model, seed=3)
    ddp = DataParallel(model, ctx.comm("dp"), bucket_mb=0.002)
    x, y = _batch()
    rows = GLOBAL_BATCH // ctx.dims.dp
    start = ctx.coords.dp * rows
    ddp.scale_loss(model.loss(x[start : start + rows], y[start : start + rows])).backward()
    ddp.finish_gradient_sync()
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def test_scale_loss_divides_once() -> None:
    """loss / n through scale_loss: the buckets skip their division, the mean is unchanged."""
    want = _single_process_grads()
    for result in run_ranks(_rank_scaled_loss, 2, timeout_s=60):
        for name, grad in want.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _rank_carry_and_norm(clip: float) -> dict:
    """A scalar carried in the last bucket and the norm measured during the sync, with accumulation."""
    config = load_config(None, MODEL)
    ctx = init_distributed(config.parallel)
    model = Transformer(config.model, seed=3)
    ddp = DataParallel(model, ctx.comm("dp"), bucket_mb=0.002, measure_norm=True)
    x, y = _batch()
    rows = GLOBAL_BATCH // ctx.dims.dp
    value = torch.tensor(1.5 + ctx.coords.dp)
    calls_before = len(ctx.ledger.recent(10_000))
    ctx.ledger.take_step_totals()
    for k in range(2):
        start = ctx.coords.dp * rows + k * (rows // 2)
        with ddp.no_sync() if k == 0 else torch.enable_grad():
            assert k == 0 or ddp.carry(value)
            ddp.scale_loss(model.loss(x[start : start + rows // 2], y[start : start + rows // 2]) / 2).backward()
    ddp.finish_gradient_sync()
    norm = ddp.clip_grad_norm(clip)
    return {
        "value": value.item(),
        "norm": norm,
        "again": ddp.take_grad_norm(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "calls": len(ctx.ledger.recent(10_000)) - calls_before,
        "buckets": len(ddp.buckets),
        "bytes": ctx.ledger.take_step_totals()["comm_bytes_dp"],
        "param_bytes": ddp.parameter_bytes,
    }


@pytest.mark.parametrize(("world", "clip"), [(2, 1e-3), (4, float("inf"))])
def test_carried_scalar_and_measured_norm(world: int, clip: float) -> None:
    """The carried value comes back as the dp mean at no extra collective; the norm and clip equal torch's."""
    results = run_ranks(_rank_carry_and_norm, world, args=(clip,), timeout_s=90)
    model = Transformer(load_config(None, MODEL).model, seed=3)
    model.loss(*_batch()).backward()
    want_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    for result in results:
        assert result["value"] == pytest.approx(sum(1.5 + r for r in range(world)) / world, rel=1e-7)
        assert result["calls"] == result["buckets"]  # one all-reduce per bucket, none for the value
        assert result["bytes"] == model_bytes("all_reduce", world, result["param_bytes"] + 4)
        assert result["norm"] == pytest.approx(want_norm, rel=1e-5)
        assert result["again"] is None  # taken once: it describes the gradients as the sync left them
        for name, p in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def _rank_bf16_carry() -> bool:
    ctx = init_distributed(load_config(None, []).parallel)
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    return DataParallel(model, ctx.comm("dp")).carry(torch.tensor(1.0))


def test_carry_refuses_a_16_bit_bucket() -> None:
    """A bf16 slot would round the value: carry says no, and the caller averages it itself."""
    assert run_ranks(_rank_bf16_carry, 2, timeout_s=60) == [False, False]


def _rank_late_carry() -> str:
    ctx = init_distributed(load_config(None, []).parallel)
    model = torch.nn.Linear(4, 4)
    ddp = DataParallel(model, ctx.comm("dp"))
    model(torch.ones(2, 4)).sum().backward()  # the only bucket is on the wire now
    try:
        ddp.carry(torch.tensor(1.0))
    except RuntimeError as exc:
        return str(exc)
    finally:
        ddp.finish_gradient_sync()
    return "no error"


def test_carry_after_the_last_bucket_left_is_an_error() -> None:
    """A value carried too late would read back whatever the slot held: refuse it."""
    for message in run_ranks(_rank_late_carry, 2, timeout_s=60):
        assert "before the step's last backward" in message


def _rank_without_shm() -> dict:
    """/dev/shm missing: auto falls back to the backend, shm refuses with the reason and the fix."""
    from loom.distributed import shm
    from loom.errors import LoomError

    ctx = init_distributed(load_config(None, []).parallel)
    shm.SHM_DIR = Path("/nonexistent-shm")
    auto = DataParallel(torch.nn.Linear(4, 4), ctx.comm("dp"), transport="auto").transport
    try:
        DataParallel(torch.nn.Linear(4, 4), ctx.comm("dp"), transport="shm")
    except LoomError as exc:
        return {"auto": auto, "error": str(exc)}
    return {"auto": auto, "error": ""}


def test_transport_falls_back_or_refuses_without_shared_memory() -> None:
    for result in run_ranks(_rank_without_shm, 2, timeout_s=60):
        assert result["auto"] == "backend"
        assert "ddp.transport = 'shm'" in result["error"] and "/nonexistent-shm does not exist" in result["error"]
        assert "set ddp.transport = 'auto'" in result["error"]


def test_transport_must_be_known() -> None:
    from loom.errors import LoomError

    with pytest.raises(LoomError, match="ddp.transport"):
        load_config(None, ['ddp.transport="tcp"']).validate()
