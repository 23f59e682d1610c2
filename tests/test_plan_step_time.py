"""The step-time model's terms: dropout draws, a CPU host's shared cores, and calibration."""

from __future__ import annotations

import dataclasses

import pytest

from loom.config import load_config
from loom.plan.hardware import HARDWARE, Hardware
from loom.plan.layout import Layout, compute_seconds, dropout_draws, predict
from loom.plan.report import calibrate, calibrate_overhead, calibrate_rewrite, calibrate_threads, calibrate_turns

ITEMS = ["model.n_layers=2", "model.d_model=16", "model.n_heads=4", "model.vocab_size=64", "train.seq_len=8"]


def _layout(tp: int = 1, sp: bool = False, recompute: str = "none", micro_batch: int = 2) -> Layout:
    return Layout(1, tp, 1, 1, "1f1b", 0, sp, recompute, micro_batch)


@pytest.mark.parametrize(
    ("tp", "sp", "recompute", "attention", "per_microbatch"),
    [
        # per layer: 2 residual masks of b s h = 2 x 2 x 8 x 16 = 512, the probabilities' b (a/t) s^2;
        # then the embedding's b s h = 256 once
        (1, False, "none", "dense", 2 * (512 + 2 * 4 * 64) + 256),
        (2, False, "none", "dense", 2 * (512 + 2 * 2 * 64) + 256),  # each tp rank draws the whole residual mask
        (2, True, "none", "dense", 2 * (256 + 2 * 2 * 64) + 128),  # sp: its slice of the sequence
        (1, False, "selective", "dense", 2 * (512 + 2 * 2 * 4 * 64) + 256),  # the probabilities twice
        (1, False, "full", "dense", 2 * 2 * (512 + 2 * 4 * 64) + 256),  # the whole layer twice
        (1, False, "none", "topk", 2 * 512 + 256),  # no dropout on top-k probabilities
    ],
)
def test_dropout_draws_count_every_mask(tp: int, sp: bool, recompute: str, attention: str, per_microbatch: int) -> None:
    config = load_config(None, [*ITEMS, "model.dropout=0.1", f'model.attention="{attention}"', "model.top_k=4"])
    assert dropout_draws(config, _layout(tp, sp, recompute), 3) == 3 * per_microbatch
    assert dropout_draws(load_config(None, ITEMS), _layout(), 3) == 0  # no dropout, nothing drawn


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_a_run_recomputing_some_blocks_is_charged_for_those_alone(recompute: str) -> None:
    """recompute_layers = N of 4 blocks: the FLOPs, draws and rewrites of N recomputed blocks,
    between no recomputation and every block's (pp 2: N per stage, so 2N of the model's)."""
    items = [*ITEMS, "model.n_layers=4", "model.dropout=0.1", "train.global_batch=4", "train.micro_batch=2"]
    items += [f'train.recompute="{recompute}"']
    cpu = HARDWARE["cpu"]

    def run(pp: int, layers: int | None) -> object:
        config = load_config(None, items + ([f"train.recompute_layers={layers}"] if layers is not None else []))
        return predict(config, Layout(1, 1, pp, 1, "1f1b", 0, False, recompute, 2), cpu, 4)

    none = predict(load_config(None, items[:-1]), Layout(1, 1, 1, 1, "1f1b", 0, False, "none", 2), cpu, 4)
    every = run(1, None)
    one = run(1, 1)
    assert none.step_s < one.step_s < every.step_s
    # hardware over model FLOPs: one block's extra is a quarter of every block's
    extra = [p.hfu / p.mfu - 1 for p in (one, every)]
    assert extra[0] == pytest.approx(extra[1] / 4)
    assert one.rewrite_bytes == pytest.approx(every.rewrite_bytes / 4)
    assert one.dropout_s - none.dropout_s == pytest.approx((every.dropout_s - none.dropout_s) / 4)
    staged = run(2, 1)  # one block of each stage's two: half the model
    assert staged.hfu / staged.mfu - 1 == pytest.approx(extra[1] / 2)
    assert staged.rewrite_bytes == pytest.approx(every.rewrite_bytes / 4)  # one block per micro-batch on a rank


def test_a_cpu_host_shares_its_cores_and_a_gpu_does_not() -> None:
    host = Hardware("host", 1e9, 1e9, 1e9, 8, 1e9, 1e9, compute_efficiency=1.0, cores=2, thread_efficiency=0.5)
    # one process: two threads, 1.5x one thread's rate; the dropout draws do not speed up
    assert compute_seconds(host, "fp32", 1e9, 0.1, 1, 0.0) == pytest.approx((1 / 1.5 + 0.1,) * 2)
    # two processes: a thread each, and the bubble idles them
    assert compute_seconds(host, "fp32", 1e9, 0.1, 2, 0.5) == pytest.approx((1.1, 1.1 * 1.5))
    # four processes on two cores take turns: the bubble is filled by the others
    assert compute_seconds(host, "fp32", 1e9, 0.1, 4, 0.5) == pytest.approx((1.1, 1.1 * 4 / 2))
    gpu = dataclasses.replace(host, cores=0)
    assert compute_seconds(gpu, "fp32", 1e9, 0.1, 4, 0.5) == pytest.approx((1.1, 1.1 * 1.5))


def test_calibration_recovers_a_hosts_rates() -> None:
    items = [*ITEMS, "model.dropout=0.1", "train.global_batch=4", "train.micro_batch=2"]
    config = load_config(None, items)
    recomputing = load_config(None, [*items, 'train.recompute="full"'])
    cpu = HARDWARE["cpu"]
    true = dataclasses.replace(
        cpu, compute_efficiency=0.8, thread_efficiency=0.9, rewrite_bandwidth=3e9, layer_overhead_s=2e-6
    )
    guess = dataclasses.replace(
        cpu, compute_efficiency=0.3, thread_efficiency=0.2, rewrite_bandwidth=5e8, layer_overhead_s=0.0
    )

    def step(hardware: Hardware, threads: int, cfg=config, recompute: str = "none", micro: int = 2):
        host = dataclasses.replace(hardware, cores=threads, devices_per_node=1)
        return predict(cfg, _layout(recompute=recompute, micro_batch=micro), host, 4, "cpu")

    # one run holds the blocks' fixed cost in its rate; a second with more, smaller micro-batches tells them apart
    rate_only = calibrate(step(guess, 1), {"step_s": step(true, 1).step_s}, guess)
    assert rate_only.compute_efficiency < 0.8 and step(true, 1, micro=1).overhead_units == 2 * 4
    one = calibrate_overhead(
        (step(rate_only, 1), {"step_s": step(true, 1).step_s}),
        (step(rate_only, 1, micro=1), {"step_s": step(true, 1, micro=1).step_s}),
        rate_only,
    )
    assert one.compute_efficiency == pytest.approx(0.8) and one.layer_overhead_s == pytest.approx(2e-6)
    assert calibrate(step(one, 1), {"step_s": step(true, 1).step_s}, one).compute_efficiency == pytest.approx(0.8)
    same = (step(one, 1), {"step_s": step(true, 1).step_s})
    assert calibrate_overhead(same, same, one) == one  # one run cannot tell the two apart
    both = calibrate_threads(step(one, 2), {"step_s": step(true, 2).step_s}, one, 2)
    assert both.thread_efficiency == pytest.approx(0.9)
    assert step(both, 2).step_s == pytest.approx(step(true, 2).step_s)
    full = step(both, 2, recomputing, "full")
    assert full.rewrite_bytes > 0 and step(both, 2).rewrite_bytes == 0
    fitted = calibrate_rewrite(full, {"step_s": step(true, 2, recomputing, "full").step_s}, both)
    assert fitted.rewrite_bandwidth == pytest.approx(3e9)


def test_transfers_wait_turns_only_with_more_processes_than_cores() -> None:
    from loom.plan.comm import transfers

    config = load_config(None, [*ITEMS, "train.global_batch=4", "train.micro_batch=1"])
    layout = Layout(1, 2, 2, 1, "1f1b", 0, False, "none", 1)  # tp 2 x pp 2: 4 processes
    cpu = dataclasses.replace(HARDWARE["cpu"], turn_latency=3e-3)
    own = predict(config, layout, dataclasses.replace(cpu, cores=4, devices_per_node=4), 4, "cpu")
    crowded_host = dataclasses.replace(cpu, cores=2, devices_per_node=4)
    crowded = predict(config, layout, crowded_host, 4, "cpu")
    # per micro-batch (4 of them): tp's 4L + 2 = 6 collectives on the rank's 1 layer, pp's activation and gradient
    assert own.transfers == crowded.transfers == 4 * 6 + 2 * 4
    assert crowded_host.turn_wait() == pytest.approx(3e-3 * (4 / 2 - 1))
    assert dataclasses.replace(cpu, cores=2, devices_per_node=8).turn_wait() == pytest.approx(3e-3 * 3)
    assert dataclasses.replace(cpu, cores=0, devices_per_node=8).turn_wait() == 0.0  # a GPU never waits turns
    waited = sum(crowded.comm_s.values()) - sum(own.comm_s.values())
    assert waited == pytest.approx(own.transfers * 3e-3)
    assert (
        own.comm_s
        == predict(
            config, layout, dataclasses.replace(cpu, cores=4, devices_per_node=4, turn_latency=0.0), 4, "cpu"
        ).comm_s
    )
    from loom.plan.comm import CommShape

    # dp x tp without a pipeline: its collectives wait their peers' turns too (plan/comm.py)
    beside = Layout(2, 2, 1, 1, "1f1b", 0, False, "none", 1)
    unpiped = predict(config, beside, crowded_host, 4, "cpu")
    roomy_beside = predict(config, beside, dataclasses.replace(crowded_host, cores=4), 4, "cpu")
    assert unpiped.transfers > 0
    waited = sum(unpiped.comm_s.values()) - sum(roomy_beside.comm_s.values())
    assert waited == pytest.approx(unpiped.transfers * 3e-3)
    unwaited = dataclasses.replace(crowded_host, turn_latency=0.0)
    refit = calibrate_turns(predict(config, beside, unwaited, 4, "cpu"), {"step_s": unpiped.step_s}, unwaited)
    assert refit.turn_latency == pytest.approx(3e-3)
    alone = CommShape(1, 16, 64, 8, 1, 4, 1, 1, 1, 1, False, 0, 100, 4, 4, 4, 4, "none", 0, False)
    assert transfers(alone) == {"tp": 0, "dp": 0, "pp": 0}  # groups of one move nothing
    # fitted back from a measured step: the excess over the transfers and the processes queued per core
    guess = dataclasses.replace(crowded_host, turn_latency=0.0)
    fitted = calibrate_turns(predict(config, layout, guess, 4, "cpu"), {"step_s": crowded.step_s}, guess)
    assert fitted.turn_latency == pytest.approx(3e-3)
    roomy = dataclasses.replace(guess, cores=4)
    assert calibrate_turns(predict(config, layout, roomy, 4, "cpu"), {"step_s": 9.0}, roomy) == roomy


def test_a_split_backward_bubble_follows_the_forward_backward_and_weight_times() -> None:
    from loom.parallel.pipeline.simulate import bubble_formula
    from loom.plan.flops import GPTShape
    from loom.plan.layout import pass_costs

    shape = GPTShape(layers=2, hidden=1024, vocab=0, seq=8)  # the attention core is 4s/(24h): negligible
    plain = pass_costs(shape, 3.0, 6.0, 1.0, 0.0, 0.0)
    assert (plain.forward, plain.backward) == (3.0, 6.0) and plain.weight == pytest.approx(3.0, rel=2e-3)
    # Qi et al.'s uniform case, F = W = B/2: (p-1)/(3m)
    assert bubble_formula("zero_bubble", 4, 8, 1, plain)[1] == pytest.approx(3 / 24, rel=1e-2)
    heavy = pass_costs(shape, 3.0, 6.0, 1.0, 2.0, 2.0)  # dropout drawn in the forward
    assert heavy.forward == 5.0 and heavy.backward == 6.0
    assert bubble_formula("zero_bubble", 4, 8, 1, heavy)[1] > bubble_formula("zero_bubble", 4, 8, 1, plain)[1]
    core = pass_costs(GPTShape(layers=2, hidden=64, vocab=0, seq=384), 3.0, 6.0, 1.0, 0.0, 0.0)
    assert core.weight == pytest.approx(3.0 / 2)  # 4s^2h = 24sh^2 (s = 6h): half the forward is the weightless core


def test_a_weight_pass_faster_than_the_rate_is_fitted_from_a_zero_bubble_runs_timeline(tmp_path) -> None:
    """W's matmuls run at ``weight_pass_speedup`` x the calibrated rate; the speed-up is fitted on a
    measured split backward (the pp ranks past the first: the first runs its whole backward as W)."""
    import json

    from loom.plan.flops import GPTShape
    from loom.plan.layout import pass_costs
    from loom.plan.report import calibrate_weight_pass, measured_passes

    shape = GPTShape(layers=2, hidden=1024, vocab=0, seq=8)
    quick = pass_costs(shape, 3.0, 6.0, 1.0, 0.0, 0.0, weight_speedup=2.0)
    assert (quick.forward, quick.backward) == (3.0, 6.0) and quick.weight == pytest.approx(1.5, rel=2e-3)
    assert pass_costs(shape, 3.0, 6.0, 1.0, 0.0, 0.0, weight_speedup=0.1).weight == 6.0  # never more than B

    def spans(kind: str, seconds: float, n: int = 2) -> list[dict]:
        return [{"kind": kind, "microbatch": i, "chunk": 0, "start": float(i), "end": i + seconds} for i in range(n)]

    # rank 0 (the first stage) ran its whole backward as W; rank 1: F 3, I 4, W 1 a micro-batch
    ranks = [spans("F", 3.0) + spans("I", 0.0) + spans("W", 5.0), spans("F", 3.0) + spans("I", 4.0) + spans("W", 1.0)]
    (tmp_path / "pipeline_timeline.json").write_text(json.dumps({"ranks": ranks}))
    assert measured_passes(tmp_path) == {"forward": 6.0, "input": 8.0, "weight": 2.0}
    assert measured_passes(tmp_path / "missing") is None

    config = load_config(None, [*ITEMS, "train.global_batch=4", "train.micro_batch=1", "parallel.schedule=zero_bubble"])
    layout = Layout(1, 1, 2, 1, "zero_bubble", 0, False, "none", 1)
    cpu = dataclasses.replace(HARDWARE["cpu"], layer_overhead_s=0.0)  # this tiny model's FLOPs alone
    before = predict(config, layout, cpu, 2, "cpu")
    fitted = calibrate_weight_pass(before, {"passes": measured_passes(tmp_path)}, cpu)
    after = predict(config, layout, fitted, 2, "cpu")
    assert after.passes.weight / (after.passes.forward + after.passes.backward) == pytest.approx(2.0 / 16.0)
    assert (after.passes.forward, after.passes.backward) == (before.passes.forward, before.passes.backward)
    assert after.bubble > before.bubble and after.compute_s == before.compute_s  # less W to fill the bubble with
    assert calibrate_weight_pass(before, {"passes": None}, cpu) == cpu
    one_f_one_b = predict(config, dataclasses.replace(layout, schedule="1f1b"), cpu, 2, "cpu")
    assert predict(config, dataclasses.replace(layout, schedule="1f1b"), fitted, 2, "cpu").bubble == one_f_one_b.bubble


def test_causal_kernels_cost_the_step_what_they_compute_while_mfu_counts_the_square() -> None:
    from loom.attention_walk import causal_run_scores
    from loom.plan.activations import computed_fraction
    from loom.plan.flops import GPTShape, hardware_flops, model_flops
    from loom.plan.layout import achieved_rate

    # query tiles against the keys up to their end: n tiles of 128 on CUDA compute (n + 1) / 2n
    assert computed_fraction("flash", "cuda", 1024) == pytest.approx(9 / 16)
    assert computed_fraction("flash", "cuda", 128) == 1.0
    assert computed_fraction("flash", "cpu", 512) == 1.0  # torch's CPU kernel: one key tile of 512 covers it
    # 8 query tiles of 256, keys in tiles of 512: 512, 512, 1024, 1024, ..., 2048, 2048
    assert computed_fraction("flash", "cpu", 2048) == pytest.approx(2 * 256 * (512 + 1024 + 1536 + 2048) / 2048**2)
    assert computed_fraction("dropout", "cpu", 1024) == causal_run_scores(1024) / 1024**2
    assert computed_fraction("topk", "cpu", 1024) == 1.0
    s = 4096
    config = load_config(None, [*ITEMS[:-1], f"train.seq_len={s}", f"model.max_seq_len={s}", "model.dropout=0.0"])
    h100 = HARDWARE["h100-sxm"]
    p = predict(config, _layout(micro_batch=1), h100, 1, "cuda")
    shape = GPTShape(2, 16, 64, s)
    ran = hardware_flops(dataclasses.replace(shape, attention_density=computed_fraction("flash", "cuda", s)), 1)
    assert p.compute_s == pytest.approx(ran / achieved_rate(h100, config.train.precision, 1))
    assert ran < 0.6 * hardware_flops(shape, 1)  # at 4096 tokens and d 16 the core is nearly all of it
    assert p.mfu == pytest.approx(model_flops(shape, 1) / p.step_s / h100.peak_flops(config.train.precision))
