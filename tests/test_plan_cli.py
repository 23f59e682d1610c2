"""``loom plan``: the search over layouts, its refusals, and a run's prediction beside its measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from loom.cli import main
from loom.config import load_config
from loom.plan.hardware import HARDWARE, load_hardware
from loom.plan.layout import plan


def test_a_small_model_on_one_node_is_best_plain_data_parallel() -> None:
    # gpt2-124m fits on every H100 whole: nothing beats replicating it (no tp or pp traffic,
    # no bubble, no recomputation), and ZeRO-3's extra gathers cost more than they save
    config = load_config(None, ['model.preset="gpt2-124m"', "train.seq_len=1024", 'train.precision="bf16"'])
    best = plan(config, 8, 64, HARDWARE["h100-sxm"])[0]
    assert best.fits
    layout = best.layout
    assert (layout.dp, layout.tp, layout.pp, layout.recompute) == (8, 1, 1, "none") and layout.zero < 3


def test_a_big_model_needs_sharding_and_the_ranking_prefers_fitting_layouts() -> None:
    config = load_config(None, ['model.preset="llama-70b"', "train.seq_len=4096", 'train.precision="bf16"'])
    ranked = plan(config, 64, 128, HARDWARE["h100-sxm"])
    fitting = [p for p in ranked if p.fits]
    assert fitting and all(p.fits for p in ranked[: len(fitting)])  # fitting layouts first
    assert [p.step_s for p in fitting] == sorted(p.step_s for p in fitting)
    assert all(p.layout.tp * p.layout.pp > 1 or p.layout.zero == 3 for p in fitting)  # 70B never whole on 80 GB
    assert all(p.memory.total <= HARDWARE["h100-sxm"].memory_bytes for p in fitting)


def test_plan_prints_the_best_layouts_and_explains_one(capsys) -> None:
    assert (
        main(
            [
                "plan",
                "--model",
                "llama-7b",
                "--gpus",
                "8",
                "--seq-len",
                "2048",
                "--global-batch",
                "32",
                "--explain",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Best 5 by predicted step time" in out and "MFU" in out
    assert "memory per device" in out and "communication per step" in out


def test_plan_json_is_for_tools(capsys) -> None:
    assert main(["plan", "--model", "gpt2-124m", "--gpus", "2", "--gpu", "a100-80gb", "--json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and len(data["layouts"]) == 3 and data["hardware"]["name"] == "a100-80gb"


def test_a_request_that_fits_nowhere_says_what_is_needed(capsys) -> None:
    assert main(["plan", "--model", "llama-70b", "--gpus", "1", "--seq-len", "4096", "--global-batch", "8"]) == 1
    out = capsys.readouterr().out
    assert "no layout of 1 x h100-sxm fits" in out and "GiB per device" in out and "more devices" in out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--gpu", "tpu9"], "unknown device 'tpu9'"),
        (["--gpus", "0"], "--gpus 0"),
        (["--gpus", "7", "--model", "gpt2-124m", "--global-batch", "4"], "no layout of 7 devices is valid"),
        (["--model", "gpt5"], "unknown model preset"),
        (["--hardware-file", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_bad_plan_requests_get_one_clear_paragraph(argv: list[str], match: str, capsys) -> None:
    assert main(["plan", *argv]) == 2
    assert match in capsys.readouterr().err


def test_user_defined_hardware_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "hw.toml"
    path.write_text(
        "[mygpu]\npeak_flops_bf16 = 1e15\npeak_flops_fp32 = 5e13\nmemory_bytes = 96e9\ndevices_per_node = 4\n"
        "intra_bandwidth = 4e11\ninter_bandwidth = 5e10\n"
    )
    hw = load_hardware("mygpu", path)
    assert hw.memory_bytes == 96e9 and hw.devices_per_node == 4 and hw.compute_efficiency == 0.5


def test_a_run_beside_its_prediction_and_calibration(tmp_path: Path, text_corpus: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run)]
    for item in tiny_overrides(text_corpus, **{"train.steps": 4, "train.eval_every": 0}):
        argv += ["--set", item]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    plan_ = summary["plan"]
    for name in ("params", "grads", "optim", "activations"):
        assert plan_["measured"]["memory"][name] == pytest.approx(plan_["predicted"]["memory"][name], rel=0.05), name
    capsys.readouterr()
    assert main(["plan", "--run", str(run)]) == 0
    assert "memory activations MiB" in capsys.readouterr().out
    assert main(["plan", "--calibrate", str(run)]) == 0
    assert "GFLOP/s per device" in capsys.readouterr().out
    assert (run / "hardware.toml").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "plan",
                "--run",
                str(run),
                "--hardware-file",
                str(run / "hardware.toml"),
                "--gpu",
                "cpu-calibrated",
                "--json",
            ]
        )
        == 0
    )
    compared = json.loads(capsys.readouterr().out)
    assert compared["predicted"]["step_s"] == pytest.approx(compared["measured"]["step_s"], rel=1e-6)


def test_calibration_fits_the_links_and_recomputation_on_the_runs_that_show_them(
    tmp_path: Path, text_corpus: Path, capsys, monkeypatch
) -> None:
    runs = []
    nproc = {"tp2": 2, "dp2 pp2": 4, "zb": 2}
    for name, extra in (
        ("one", {}),
        ("tp2", {"parallel.tp": 2}),
        ("full", {"train.recompute": "full"}),
        ("dp2 pp2", {"parallel.pp": 2, "train.micro_batch": 1}),
        ("accum", {"train.micro_batch": 1, "train.grad_accum": 4}),  # one's FLOPs in 4 micro-batches
        ("zb", {"parallel.pp": 2, "parallel.schedule": "zero_bubble", "train.micro_batch": 1}),
    ):
        run = tmp_path / name.replace(" ", "_")
        argv = ["train", "--run-dir", str(run)] + (["--nproc", str(nproc[name])] if name in nproc else [])
        for item in tiny_overrides(text_corpus, **{"train.steps": 4, "train.eval_every": 0, **extra}):
            argv += ["--set", item]
        assert main(argv) == 0
        runs.append(str(run))
    capsys.readouterr()
    monkeypatch.setattr("loom.plan.hardware.os.sched_getaffinity", lambda pid: {0, 1})  # a 2-core host, as here
    assert main(["plan", "--calibrate", runs[1]]) == 2  # tp traffic alone: compute and links are not separable
    assert "add a run without tensor or pipeline parallelism" in capsys.readouterr().err
    assert main(["plan", "--calibrate", runs[2]]) == 2  # recomputation alone: compute and its rewrites neither
    capsys.readouterr()
    assert main(["plan", "--calibrate", *runs]) == 0
    out = capsys.readouterr().out
    assert "recomputation rewrites at" in out and "links" in out and "from 1 run(s)" in out
    fitted = load_hardware("cpu-calibrated", tmp_path / "one" / "hardware.toml")
    assert fitted.rewrite_bandwidth != HARDWARE["cpu"].rewrite_bandwidth  # fitted, not the default
    assert fitted.intra_bandwidth != HARDWARE["cpu"].intra_bandwidth
    # the dp2 x pp2 run's 4 processes on 2 cores: its pipeline's transfers waited turns
    assert "from 1 run(s) with more processes than cores" in out
    assert fitted.turn_latency != HARDWARE["cpu"].turn_latency
    # one and accum: the rate and the blocks' fixed cost per micro-batch; zb's timeline: W's share
    assert "each block costs" in out and fitted.layer_overhead_s >= 0
    assert "weight pass computes at" in out and "from 1 zero-bubble run(s)" in out
    assert fitted.weight_pass_speedup != HARDWARE["cpu"].weight_pass_speedup


def test_plan_ranks_the_layouts_of_a_sparse_model(capsys, monkeypatch) -> None:  # noqa: ANN001
    """A sparse layout's block need not divide the probe loom plan reads the model's length with,
    and the layout's figures are built once for the whole search."""
    from loom import attention_walk

    argv = ["plan", "--model", "tiny", "--gpus", "4", "--seq-len", "8192", "--top", "1"]
    argv += ["--set", 'model.attention="sparse"', "--set", 'model.sparse_attention.mode="fixed"']
    calls = []
    real = attention_walk.head_layout
    monkeypatch.setattr(attention_walk, "head_layout", lambda *a: calls.append(a) or real(*a))
    assert main(argv) == 0
    assert "dp4" in capsys.readouterr().out
    assert len(calls) <= 8  # each of the few figures built once, not once per candidate layout (hundreds)
