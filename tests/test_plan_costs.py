"""`spdecode plan --measure` on a tiny model: every part timed, the hardware recorded, a cost file
that round-trips through JSON; bad options are clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, tiny_model

from spdecode.plan.measure import measure
from spdecode.runtime.errors import SpdError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "model"
    tiny_model("llama").save_pretrained(path)
    return str(path)


def positive_leaves(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from positive_leaves(v)
        else:
            yield v > 0


def test_measure_times_every_part_and_records_the_machine(tiny_dir):
    costs = json.loads(json.dumps(measure(tiny_dir, threads=(1,), rows=(1, 4), contexts=(16, 64), reps=2,
                                          drafts=False, log=lambda m: None)))
    assert costs["n_layers"] == 6 and costs["rows"] == [1, 4] and costs["contexts"] == [16, 64]
    assert {"cpu", "cores", "torch", "device", "measured"} <= set(costs["hardware"])
    kinds = ["1", "1 concurrent"] if costs["hardware"]["cores"] >= 2 else ["1"]
    assert sorted(costs["target"]) == kinds
    for k in kinds:
        t = costs["target"][k]
        assert set(t["layer"]) == {"16", "64"} and all(set(v) == {"1", "4"} for v in t["layer"].values())
        assert set(t["head"]) == {"1", "4"} and set(t["chunk1_in_flight"]) == {"16", "64"}
        assert all(positive_leaves(t))
    link = costs["link"]
    assert link["backend"] == "gloo" and 0 < link["latency_s"] < 1 and link["bandwidth_bytes_per_s"] > 1e6


def test_contexts_beyond_the_model_are_dropped_and_bad_options_refused(tiny_dir, capsys):
    costs = measure(tiny_dir, threads=(1,), rows=(1,), contexts=(16, 10_000), reps=1, drafts=False, link=False,
                    concurrent=False, log=lambda m: None)
    assert costs["contexts"] == [16] and "link" not in costs and list(costs["target"]) == ["1"]
    with pytest.raises(SpdError, match="thread counts"):
        measure(tiny_dir, threads=(0,), log=lambda m: None)
    code, err = run_cli(capsys, "plan", "--measure")
    assert code == 2 and "--out" in err
    code, err = run_cli(capsys, "plan", "--measure", "--model", tiny_dir, "--threads", "a")
    assert code == 2 and err.startswith("error:")


def test_a_table_timed_in_rounds_keeps_each_entrys_median():
    """plan --measure times the target's table in rounds (the machine's speed drifts between them)
    and keeps each entry's median: one slow round does not make the table slow."""
    from spdecode.plan.measure import median_tables

    rounds = [{"layer": {"128": {"1": 1.0, "2": 2.0}}, "step": {"128": 10.0}},
              {"layer": {"128": {"1": 9.0, "2": 2.2}}, "step": {"128": 11.0}},  # a slow moment for one row
              {"layer": {"128": {"1": 1.2, "2": 9.0}}, "step": {"128": 30.0}}]
    assert median_tables(rounds) == {"layer": {"128": {"1": 1.2, "2": 2.2}}, "step": {"128": 11.0}}
    # The pipeline calibration's lists (one entry per run kind) likewise; names and shapes kept.
    calibrations = [{"stage_slot_s": [1.0, 5.0], "backend": "gloo", "shape": [8, 2, 4]},
                    {"stage_slot_s": [3.0, 4.0], "backend": "gloo", "shape": [8, 2, 4]},
                    {"stage_slot_s": [2.0, 9.0], "backend": "gloo", "shape": [8, 2, 4]}]
    assert median_tables(calibrations) == {"stage_slot_s": [2.0, 5.0], "backend": "gloo", "shape": [8, 2, 4]}
    with pytest.raises(SpdError, match="rounds"):
        measure("unused", rounds=0, log=lambda m: None)


def test_a_cost_file_timed_between_runs_times_a_round_before_each(tiny_dir):
    """plan --validate times its cost file between its runs: `between(r, costs)` runs after round
    r's timings with that round's whole file, every part in that round (here the concurrent table
    too), and the file keeps each entry's median over the rounds."""
    log, calls, tables = [], [], []

    def between(r, costs):
        calls.append((r, list(log)))
        tables.append(costs)

    costs = measure(tiny_dir, threads=(1,), rows=(1, 2), contexts=(16,), reps=1, drafts=False, link=False,
                    rounds=2, between=between, log=log.append)
    assert [r for r, _ in calls] == [0, 1]
    assert calls[0][1][-1].endswith("round 1 of 2") or "two processes" in calls[0][1][-1]
    assert any("round 1 of 2" in m for m in calls[0][1]) and not any("round 2 of 2" in m for m in calls[0][1])
    assert any("round 2 of 2" in m for m in calls[1][1])
    kinds = ["1", "1 concurrent"] if costs["hardware"]["cores"] >= 2 else ["1"]
    assert sorted(costs["target"]) == kinds and sum("two processes" in m for m in log) == 2 * (len(kinds) - 1)
    assert set(costs["target"]["1"]["layer"]["16"]) == {"1", "2"} and all(positive_leaves(costs["target"]["1"]))
    # Each round's file is whole (a run is predicted from it alone) and the saved one their median.
    assert all(sorted(t["target"]) == kinds and t["n_layers"] == costs["n_layers"] for t in tables)
    one_row = [t["target"]["1"]["layer"]["16"]["1"] for t in tables]
    assert costs["target"]["1"]["layer"]["16"]["1"] == pytest.approx(sum(one_row) / 2)


def test_a_group_of_the_cost_table_is_timed_again_where_the_slow_state_met_it(tiny_dir):
    """With plan --validate's gate (plan/steady.py) the table is timed a few row counts at a time
    between a wait and a check (a second or two, shorter than the slow state's episodes), and the
    group the slow state met is timed again alone."""
    from test_plan_steady import scripted

    from spdecode.plan.costs import row_groups
    from spdecode.plan.steady import SteadyGate

    assert row_groups(range(1, 10)) == [(1, 2, 3, 4), (5, 6, 7, 8), (9,)]
    log = []
    # At context 16: rows 1-2, then one row in flight and a step; then the head at rows 1-2. The
    # first group's check reads slow once; a steady check stands for the next group's wait.
    io, left = scripted([1.0, 1.5, 1.0, 1.0, 1.0, 1.0])
    gate = SteadyGate(**io, max_wait_s=0.0)
    costs = measure(tiny_dir, threads=(1,), rows=(1, 2), contexts=(16,), reps=1, drafts=False, link=False,
                    concurrent=False, pipeline=False, rounds=1, gate=gate, log=log.append)
    assert sum("round 1 of 1" in m for m in log) == 1 and not left
    retaken = [e["what"] for e in gate.events if e["kind"] == "retake"]
    assert retaken == ["the table at 1 thread(s), round 1: context 16, rows 1-2"] and gate.summary()["gauges"] == 4
    assert set(costs["target"]["1"]["layer"]["16"]) == {"1", "2"} and set(costs["target"]["1"]["head"]) == {"1", "2"}


def test_a_part_is_timed_after_what_precedes_it_at_work_and_that_is_not_charged_to_it():
    """The head and a drafter's pass are timed right after a pass over the target (alone in a loop
    they find their weights warm and come out fast): `before` runs ahead of every timed call, and
    its own time stays out of the median."""
    import time

    from spdecode.plan.costs import median_time

    calls = []

    def before():
        calls.append("before")
        time.sleep(0.02)

    def part():
        calls.append("part")

    assert median_time(part, 4, before=before) < 0.01
    assert calls == ["part"] + ["before", "part"] * 4  # the warm-up, then every timing preceded
    calls.clear()
    assert median_time(part, 3) < 0.01 and calls == ["part"] * 4
