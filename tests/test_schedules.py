"""Pipeline schedules as data, their simulator and charts: formulas, invariants, rejections.

Pure Python, no processes: the schedules are checked structurally and by simulation.
"""

from __future__ import annotations

import ast
import json
from fractions import Fraction
from pathlib import Path

import pytest

from loom.cli import main
from loom.errors import LoomError
from loom.parallel.pipeline import check as check_mod
from loom.parallel.pipeline import schedules as sched_mod
from loom.parallel.pipeline import simulate as sim_mod
from loom.parallel.pipeline.check import check_schedule
from loom.parallel.pipeline.schedules import (
    SCHEDULES,
    Action,
    build_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zero_bubble,
)
from loom.parallel.pipeline.simulate import Costs, bubble_formula, from_measurements, load_measured, simulate
from loom.viz.schedule import draw_timeline

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def exact_bubble(name: str, p: int, m: int, vp: int = 1) -> Fraction:
    """Bubble of the unit-cost simulation as an exact fraction (all times are whole numbers)."""
    timeline = simulate(build_schedule(name, p, m, vp))
    busy = max(timeline.busy)
    return Fraction(timeline.makespan - busy) / Fraction(busy)


def grid():
    for name in SCHEDULES:
        for p in (1, 2, 3, 4):
            for m in (1, 2, 3, 4, 5, 8):
                for vp in (1, 2, 3) if name == "interleaved_1f1b" else (1,):
                    if vp > 1 and (p < 2 or m % p):
                        continue
                    yield name, p, m, vp


# ---------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 4), (2, 8), (4, 4), (4, 8), (4, 16), (3, 7), (4, 2), (8, 3)])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m(name: str, p: int, m: int) -> None:
    assert exact_bubble(name, p, m) == Fraction(p - 1, m)
    assert bubble_formula(name, p, m) == ("(p-1)/m", (p - 1) / m)


@pytest.mark.parametrize(
    "p,vp,m", [(2, 2, 4), (2, 2, 8), (4, 2, 4), (4, 2, 8), (4, 2, 16), (2, 3, 4), (4, 3, 8), (3, 2, 6)]
)
def test_interleaved_bubble_is_p_minus_1_over_vp_m(p: int, vp: int, m: int) -> None:
    assert exact_bubble("interleaved_1f1b", p, m, vp) == Fraction(p - 1, vp * m)
    assert bubble_formula("interleaved_1f1b", p, m, vp)[1] == pytest.approx((p - 1) / (vp * m))


@pytest.mark.parametrize("p,m", [(2, 2), (2, 4), (4, 4), (4, 8), (4, 9), (8, 16)])
@pytest.mark.parametrize("costs", [Costs(), Costs(1, 2, 0.5), Costs(2, 3, 1), Costs(1, 3, 1)])
def test_zero_bubble_matches_its_formula_and_beats_1f1b(p: int, m: int, costs: Costs) -> None:
    zb = simulate(zero_bubble(p, m), costs)
    assert zb.bubble_fraction == pytest.approx(bubble_formula("zero_bubble", p, m, 1, costs)[1], abs=1e-12)
    assert zb.bubble_fraction < simulate(one_f_one_b(p, m), costs).bubble_fraction


@pytest.mark.parametrize("p,m", [(2, 1), (3, 2), (4, 2), (4, 3), (4, 8), (8, 4)])
def test_zero_bubble_default_costs_strictly_below_1f1b_even_with_few_microbatches(p: int, m: int) -> None:
    assert exact_bubble("zero_bubble", p, m) < exact_bubble("1f1b", p, m)
    if m >= p:  # F = I = W: a third of 1F1B's bubble
        assert exact_bubble("zero_bubble", p, m) == exact_bubble("1f1b", p, m) / 3


def test_transfer_time_and_split_costs_are_charged() -> None:
    t = 0.25
    timeline = simulate(gpipe(2, 1), Costs(forward=1, backward=2, transfer=t))
    # rank 0 F [0,1] -> rank 1 F [1+t, 2+t], B [2+t, 4+t] -> rank 0 B [4+2t, 6+2t]
    assert [(s.action.kind, s.start, s.end) for s in timeline.ranks[1]] == [("F", 1 + t, 2 + t), ("B", 2 + t, 4 + t)]
    assert timeline.makespan == 6 + 2 * t
    split = simulate(zero_bubble(1, 1), Costs(forward=1, backward=2, weight=0.5))
    assert [(s.action.kind, s.end - s.start) for s in split.ranks[0]] == [("F", 1), ("I", 1.5), ("W", 0.5)]
    assert Costs(backward=3).weight_grad == 1.5


def test_bad_costs_are_loom_errors() -> None:
    with pytest.raises(LoomError, match="negative"):
        Costs(forward=-1)
    with pytest.raises(LoomError, match="weight-gradient cost"):
        Costs(backward=2, weight=3)


# ---------------------------------------------------------------------------- memory


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 2), (3, 3)])
def test_peak_inflight(p: int, m: int) -> None:
    assert simulate(gpipe(p, m)).peak_inflight == [m] * p
    f1b = simulate(one_f_one_b(p, m)).peak_inflight
    assert f1b == [min(p - r, m) for r in range(p)]
    assert max(f1b) <= p and f1b[0] == min(p, m)
    zb = simulate(zero_bubble(p, m)).peak_inflight
    assert zb[0] == f1b[0] and max(zb) == max(f1b)  # ZB-H1 keeps 1F1B's peak


@pytest.mark.parametrize("p,vp,m", [(2, 2, 4), (4, 2, 8), (4, 2, 4), (4, 3, 8), (2, 3, 2)])
def test_interleaved_peak_is_megatron_warmup_plus_one(p: int, vp: int, m: int) -> None:
    peaks = simulate(interleaved_1f1b(p, m, vp)).peak_inflight
    assert peaks == [min(2 * (p - r - 1) + (vp - 1) * p + 1, m * vp) for r in range(p)]


# ---------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("name,p,m,vp", list(grid()))
def test_every_schedule_is_consistent(name: str, p: int, m: int, vp: int) -> None:
    schedule = build_schedule(name, p, m, vp)
    check_schedule(schedule, p, m, vp)
    assert len(schedule) == p
    computes = sum(a.kind in ("F", "B", "I", "W") for actions in schedule for a in actions)
    assert computes == m * p * vp * (3 if name == "zero_bubble" else 2)


def test_action_lists_are_the_documented_data() -> None:
    F, B = "F", "B"
    assert one_f_one_b(2, 2) == [
        [
            Action(F, 0),
            Action("SEND_ACT", 0, peer=1),
            Action(F, 1),
            Action("SEND_ACT", 1, peer=1),
            Action("RECV_GRAD", 0, peer=1),
            Action(B, 0),
            Action("RECV_GRAD", 1, peer=1),
            Action(B, 1),
        ],
        [
            Action("RECV_ACT", 0, peer=0),
            Action(F, 0),
            Action(B, 0),
            Action("SEND_GRAD", 0, peer=0),
            Action("RECV_ACT", 1, peer=0),
            Action(F, 1),
            Action(B, 1),
            Action("SEND_GRAD", 1, peer=0),
        ],
    ]
    assert gpipe(1, 2) == [[Action(F, 0), Action(F, 1), Action(B, 0), Action(B, 1)]]
    # interleaved: rank 1 chunk 0 (stage 1) feeds rank 0 chunk 1 (stage 2)
    il = interleaved_1f1b(2, 2, 2)
    assert Action("SEND_ACT", 0, 0, peer=0) in il[1] and Action("RECV_ACT", 0, 1, peer=1) in il[0]
    assert Action("SEND_GRAD", 0, 1, peer=1) in il[0] and Action("RECV_GRAD", 0, 0, peer=0) in il[1]


def broken(schedule, rank: int, edit) -> list[list[Action]]:
    copy = [list(actions) for actions in schedule]
    copy[rank] = edit(copy[rank])
    return copy


def test_a_missing_receive_is_rejected() -> None:
    bad = broken(gpipe(2, 2), 1, lambda acts: [a for a in acts if a != Action("RECV_ACT", 1, peer=0)])
    with pytest.raises(ValueError, match="forward before its activation is received"):
        check_schedule(bad, 2, 2)


def test_swapped_send_order_is_rejected() -> None:
    F, send = "F", "SEND_ACT"

    def edit(acts):  # rank 0: both forwards, then the sends in reverse order
        return [Action(F, 0), Action(F, 1), Action(send, 1, peer=1), Action(send, 0, peer=1)] + acts[4:]

    assert gpipe(2, 2)[0][:4] == [Action(F, 0), Action(send, 0, peer=1), Action(F, 1), Action(send, 1, peer=1)]
    with pytest.raises(ValueError, match="out of order"):
        check_schedule(broken(gpipe(2, 2), 0, edit), 2, 2)
    with pytest.raises(ValueError, match="out of order"):  # the simulator alone notices too
        simulate(broken(gpipe(2, 2), 0, edit))


def test_a_backward_before_its_forward_is_rejected() -> None:
    def swap(acts):  # on the last rank: B0 moved before F0
        i, j = acts.index(Action("F", 0)), acts.index(Action("B", 0))
        acts[i], acts[j] = acts[j], acts[i]
        return acts

    with pytest.raises(ValueError, match="backward before its forward"):
        check_schedule(broken(one_f_one_b(2, 2), 1, swap), 2, 2)


def test_deadlock_is_reported_with_what_each_rank_waits_for() -> None:
    # consistent lists, but rank 0 waits for gradient 0 before sending activation 1,
    # while rank 1 runs both forwards before its first backward
    F, B = "F", "B"
    rank0 = [
        Action(F, 0),
        Action("SEND_ACT", 0, peer=1),
        Action("RECV_GRAD", 0, peer=1),
        Action(B, 0),
        Action(F, 1),
        Action("SEND_ACT", 1, peer=1),
        Action("RECV_GRAD", 1, peer=1),
        Action(B, 1),
    ]
    rank1 = [
        Action("RECV_ACT", 0, peer=0),
        Action(F, 0),
        Action("RECV_ACT", 1, peer=0),
        Action(F, 1),
        Action(B, 0),
        Action("SEND_GRAD", 0, peer=0),
        Action(B, 1),
        Action("SEND_GRAD", 1, peer=0),
    ]
    with pytest.raises(ValueError, match=r"deadlock: rank 0 waits at action 2 RECV_GRAD\(mb 0.*rank 1 waits"):
        check_schedule([rank0, rank1], 2, 2)


def test_other_mistakes_are_rejected() -> None:
    good = one_f_one_b(2, 2)
    cases = [
        (broken(good, 0, lambda a: a + [Action("F", 0)]), "appears twice"),
        (broken(good, 0, lambda a: [x for x in a if x != Action("B", 1)]), "no complete backward"),
        (
            broken(
                good,
                1,
                lambda a: [
                    Action("SEND_GRAD", 0, peer=1) if x.kind == "SEND_GRAD" and x.microbatch == 0 else x for x in a
                ],
            ),
            "wait on itself",
        ),
        (broken(good, 0, lambda a: [Action("F", 0, peer=1)] + a[1:]), "take no peer"),
        (broken(good, 0, lambda a: [Action("F", 5)] + a[1:]), "out of range"),
        (good[:1], "1 rank lists"),
    ]
    for schedule, message in cases:
        with pytest.raises(ValueError, match=message):
            check_schedule(schedule, 2, 2)
    split = zero_bubble(1, 2)
    with pytest.raises(ValueError, match="W before its I"):
        check_schedule([[Action("F", 0), Action("W", 0), Action("I", 0)] + split[0][3:]], 1, 2)


def test_bad_sizes_and_names_are_loom_errors() -> None:
    with pytest.raises(LoomError) as err:
        interleaved_1f1b(4, 6, 2)
    assert "multiple of pp" in err.value.problem and "e.g. 8" in err.value.fix
    with pytest.raises(LoomError, match="multiple of pp"):
        build_schedule("interleaved_1f1b", 2, 3, 2)
    with pytest.raises(LoomError, match="unknown pipeline schedule"):
        build_schedule("pipedream", 2, 4)
    with pytest.raises(LoomError) as err:
        build_schedule("1f1b", 2, 4, vp=2)
    assert "interleaved_1f1b" in err.value.fix
    with pytest.raises(LoomError, match="pp >= 2"):
        build_schedule("interleaved_1f1b", 1, 4, 2)
    with pytest.raises(LoomError, match="at least 1"):
        build_schedule("gpipe", 2, 0)
    assert build_schedule("interleaved_1f1b", 4, 6, 1) == one_f_one_b(4, 6)


@pytest.mark.parametrize("module", [sched_mod, sim_mod, check_mod])
def test_schedules_and_simulator_import_nothing_that_starts_processes(module) -> None:
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    allowed = {
        "__future__",
        "collections",
        "collections.abc",
        "dataclasses",
        "json",
        "pathlib",
        "typing",
        "loom.errors",
        "loom.parallel.pipeline.schedules",
        "loom.parallel.pipeline.simulate",
    }
    assert imported <= allowed, imported - allowed


# ---------------------------------------------------------------------------- measured runs and charts


def records_of(timeline, origin: float = 0.0) -> list[list[dict]]:
    return [
        [
            {
                "kind": s.action.kind,
                "microbatch": s.action.microbatch,
                "chunk": s.action.chunk,
                "start": origin + s.start,
                "end": origin + s.end,
            }
            for s in spans
        ]
        for spans in timeline.ranks
    ]


def test_measurements_give_the_same_timeline() -> None:
    simulated = simulate(interleaved_1f1b(2, 4, 2), Costs(0.5, 1.0))
    records = records_of(simulated, origin=1.7e9)
    for rank in records:
        rank.reverse()  # order of records does not matter, start times do
    records[0].append({"kind": "SEND_ACT", "microbatch": 0, "chunk": 0, "start": 1.7e9, "end": 1.7e9})
    measured = from_measurements(records)
    assert measured.measured and measured.pp == 2 and measured.vp == 2 and measured.microbatches == 4
    assert measured.makespan == pytest.approx(simulated.makespan)
    assert measured.bubble_fraction == pytest.approx(simulated.bubble_fraction)
    assert measured.peak_inflight == simulated.peak_inflight
    with pytest.raises(ValueError, match="record 0"):
        from_measurements([[{"kind": "F", "start": 0, "end": 1}]])


def test_load_measured_errors(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="does not exist"):
        load_measured(tmp_path)
    (tmp_path / "pipeline_timeline.json").write_text('{"ranks": [[{"kind": "F", "microbatch": 0}]]}')
    with pytest.raises(LoomError, match="record 0"):
        load_measured(tmp_path)
    (tmp_path / "pipeline_timeline.json").write_text("[1, 2]")
    with pytest.raises(LoomError, match="'ranks'"):
        load_measured(tmp_path)


def test_draw_timeline_writes_a_png(tmp_path: Path) -> None:
    for name, vp in (("zero_bubble", 1), ("interleaved_1f1b", 2)):
        out = draw_timeline(simulate(build_schedule(name, 2, 4, vp)), tmp_path / f"{name}.png", title=name)
        assert out.read_bytes()[:8] == PNG_HEADER


def test_cli_draws_a_chart(tmp_path: Path, capsys) -> None:
    out = tmp_path / "chart.png"
    assert (
        main(
            [
                "schedule",
                "--schedule",
                "interleaved_1f1b",
                "--pp",
                "4",
                "--vp",
                "2",
                "--microbatches",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == PNG_HEADER
    printed = capsys.readouterr().out
    assert "bubble 18.8%" in printed and str(out) in printed


def test_cli_json_gives_the_numbers(tmp_path: Path, capsys) -> None:
    assert main(["schedule", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["schedule"] == "1f1b" and (numbers["pp"], numbers["vp"], numbers["microbatches"]) == (4, 1, 8)
    assert numbers["makespan"] == 33.0 and numbers["bubble_fraction"] == numbers["bubble_theory"] == 3 / 8
    assert numbers["bubble_formula"] == "(p-1)/m" and numbers["peak_inflight"] == [4, 3, 2, 1]
    assert not list(tmp_path.iterdir())  # --json alone draws nothing

    out = tmp_path / "zb.png"
    assert (
        main(
            [
                "schedule",
                "--schedule",
                "zero_bubble",
                "--pp",
                "2",
                "--microbatches",
                "4",
                "--weight-cost",
                "0.5",
                "--forward-cost",
                "1",
                "--backward-cost",
                "2",
                "--transfer-cost",
                "0",
                "--json",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["costs"]["weight"] == 0.5 and numbers["chart"] == str(out)
    assert numbers["bubble_fraction"] == pytest.approx(numbers["bubble_theory"])
    assert out.read_bytes()[:8] == PNG_HEADER


def test_cli_from_run(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    simulated = simulate(one_f_one_b(2, 4))
    (run / "pipeline_timeline.json").write_text(json.dumps({"ranks": records_of(simulated, origin=5.0)}))
    assert main(["schedule", "--from-run", str(run)]) == 0
    assert (run / "pipeline_timeline.png").read_bytes()[:8] == PNG_HEADER
    assert "measured" in capsys.readouterr().out
    assert main(["schedule", "--from-run", str(run), "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["source"] == "measured" and numbers["pp"] == 2 and numbers["microbatches"] == 4
    assert numbers["bubble_fraction"] == pytest.approx(1 / 4) and numbers["peak_inflight"] == [2, 1]


def expect_error(argv: list[str], capsys, *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loom: error:") and "fix:" in err and "Traceback" not in err
    for word in words:
        assert word in err, err


def test_cli_errors(tmp_path: Path, capsys) -> None:
    expect_error(
        ["schedule", "--schedule", "interleaved_1f1b", "--pp", "4", "--vp", "2", "--microbatches", "6"],
        capsys,
        "multiple of pp",
        "e.g. 8",
    )
    expect_error(["schedule", "--schedule", "gpipe", "--vp", "2"], capsys, "vp = 2")
    expect_error(["schedule", "--schedule", "zigzag"], capsys, "zigzag", "zero_bubble")
    expect_error(["schedule", "--from-run", str(tmp_path)], capsys, "pipeline_timeline.json")
    expect_error(["schedule", "--from-run", str(tmp_path), "--pp", "2"], capsys, "--pp")
