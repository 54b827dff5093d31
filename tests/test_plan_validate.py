"""`spdecode plan --validate` on small settings: configurations measured here side by side with
the simulator's predictions from a cost file timed between the runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import run_cli

from spdecode.bench.report import pooled
from spdecode.generators import MethodOptions, parse_method_spec
from spdecode.plan.cost_model import CONCURRENT
from spdecode.plan.planner import load_costs
from spdecode.plan.validate import (
    compare,
    depth_acceptance,
    predict_records,
    replayed_row,
    row_setup,
    saved_setup,
    setup_for,
    steady_runs,
)
from spdecode.plan.validation_report import print_validation
from spdecode.runtime.models import DEFAULT_MODEL


@pytest.mark.parametrize("spec,sizes,distributed", [
    ("ar:threads=1", [30], False), ("sd:threads=2", [30], False), ("sd:budget=8:threads=2", [30], False),
    ("eagle:threads=2", [30], False), ("spd:stages=2:budget=1:threads=2", [15, 15], False), ("spd", [13, 17], True),
])
def test_a_saved_row_rebuilds_the_setup_it_was_measured_with(spec, sizes, distributed):
    """plan --validate --replay predicts a saved row again: from its JSON, the very setup (method,
    layers, thread key, shape, drafter) that was simulated when it was measured."""
    data, _ = load_costs(None, DEFAULT_MODEL, "float32")
    method, opts = parse_method_spec(spec, MethodOptions())
    setup = setup_for(method, opts, sizes, distributed, data, DEFAULT_MODEL)
    row = json.loads(json.dumps(saved_setup(setup) | {"stages": sizes}))
    assert row_setup(row) == setup
    # Against a cost file without concurrent timings, a pipeline's ranks take the one-thread ones.
    alone = {**data, "target": {k: v for k, v in data["target"].items() if k != CONCURRENT}}
    assert row_setup(replayed_row(row, alone)).threads == ("1" if distributed else setup.threads)


def test_each_run_is_set_against_the_costs_timed_just_before_it():
    """Timed between the runs, run r is predicted from round r's cost file: where the machine ran at
    half speed for one round (its costs and its run both slow), each run meets its prediction,
    which the rounds' median file set against the runs' median would not."""
    from test_plan_simulate import flat_costs

    def at(layer):
        data = flat_costs(layers=10, layer=layer, head=1e-3)
        data["target"]["1"]["step"] = {"128": 10 * layer + 1e-3}  # no overhead beyond layers and head
        return data

    fast, slow = at(1e-3), at(2e-3)
    ar = 1 / (10 * 1e-3 + 1e-3)  # tok/s at the fast speed: the AR token is ten layers and the head
    row = {"config": "ar:threads=1", "method": "ar", "layers": [10], "threads": "1", "distributed": False,
           "shape": [1, 1, 1], "drafter": None, "alpha": None, "measured_tokens_per_cycle": 1.0,
           "generations": [{"prompt_tokens": 100, "new_tokens": 33, "walks": []}]}
    measured = [ar, ar * 11 / 21, ar * 11 / 21]  # the second and third runs on the slow machine
    row |= {"measured_runs_tok_s": measured, "measured_tok_s": sorted(measured)[1]}
    paired = compare(fast, None, [row], {}, rounds=[fast, slow, slow])
    r = paired["records"][0]
    assert r["predicted_runs_tok_s_traces"] == pytest.approx(measured, rel=1e-9)
    assert abs(r["error_traces"]) < 1e-9 and paired["max_relative_error"] < 1e-9 and paired["runs_paired_with_rounds"]
    # Against one file for every run (here the fast one): the slow runs are 90 % off.
    single = compare(fast, None, [row], {})
    assert single["max_relative_error"] == pytest.approx(21 / 11 - 1, rel=1e-6)
    assert "round_costs" not in single and not single["runs_paired_with_rounds"]
    # A row whose runs are not one per round (a saved file from before) is set against the file alone.
    assert compare(fast, None, [row], {}, rounds=[fast, slow])["max_relative_error"] == single["max_relative_error"]


def test_the_steady_error_sets_only_the_prompts_read_steady_against_their_predictions():
    """Beside the all-units error, one over the (prompt, run)s the gate read steady before and
    after: a run the slow state met on one prompt is set against that prompt's prediction no more,
    and a run with no steady prompt drops out. Without gate flags there is no steady error."""
    from test_plan_simulate import flat_costs

    data = flat_costs(layers=10, layer=1e-3, head=1e-3)
    data["target"]["1"]["step"] = {"128": 10 * 1e-3 + 1e-3}
    ar = 1 / (10 * 1e-3 + 1e-3)
    recs = [[{"method": "ar:threads=1", "dataset": "d", "question_id": q, "steady": q in ok, "new_tokens": 33,
              "cycles": 32, "drafts_verified": 0, "drafts_accepted": 0, "n_stages": 1, "decode_s": 32 / speed,
              "decode_tok_s": speed}
             for q, speed in ((0, ar), (1, slow))] for ok, slow in (({0, 1}, ar), ({0}, ar / 2), ((), ar / 2))]
    kept = steady_runs(recs)
    assert [k["prompts"] for k in kept] == [[["d", 0], ["d", 1]], [["d", 0]], []]
    assert kept[1]["tok_s"] == pytest.approx(ar) and kept[2]["tok_s"] is None
    assert steady_runs([[{k: v for k, v in r.items() if k != "steady"} for r in run] for run in recs]) is None
    gens = [{"dataset": "d", "question_id": q, "prompt_tokens": 100, "new_tokens": 33, "walks": []} for q in (0, 1)]
    measured = [pooled(run)["decode_tok_s"] for run in recs]  # fast; half the prompts at half speed, twice
    row = {"config": "ar:threads=1", "method": "ar", "layers": [10], "threads": "1", "distributed": False,
           "shape": [1, 1, 1], "drafter": None, "alpha": None, "measured_tokens_per_cycle": 1.0,
           "generations": gens, "measured_runs_tok_s": measured, "measured_tok_s": sorted(measured)[1],
           "steady_runs": kept}
    out = compare(data, None, [row], {}, rounds=[data] * 3)
    r = out["records"][0]
    assert out["max_relative_error"] == pytest.approx(ar / measured[1] - 1, rel=1e-3)  # ~ +50 %
    assert r["steady_units"] == 3 and abs(r["error_steady_traces"]) < 1e-3 and abs(r["error_steady_alpha"]) < 1e-3
    assert out["max_relative_error_steady"] < 1e-3 and out["steady_configurations"] == 1
    # No gate: the steady error is not made up from the all-units one.
    bare = compare(data, None, [row | {"steady_runs": None}], {}, rounds=[data] * 3)
    assert bare["max_relative_error_steady"] is None and "error_steady_traces" not in bare["records"][0]
    # A saved row replayed against one file (not its rounds): the old file's steady errors are not kept.
    again = compare(data, None, [r], {})
    assert again["max_relative_error_steady"] is None and "error_steady_traces" not in again["records"][0]


def test_the_prediction_without_walks_draws_each_depths_acceptance_as_the_replay_counts_it():
    """From acceptance alone, each depth's share of accepts as the walks' replay counts them (a walk
    that ended at a leaf of the real tree stops one level down), each verification drawn on its
    own; and the expectation over several draws: SPD as published at 4 stages makes 1 / (1 + (1 -
    alpha) * 3) tokens a cycle."""
    from test_plan_simulate import flat_costs

    from spdecode.methods.spd_core import TreeShape
    from spdecode.plan.predict import Setup

    walks = [[2, 2, 1], [1, 0, 0], [2, 1, 0]]  # [tried, accepted, ended at a leaf]
    assert depth_acceptance([{"walks": walks[:2]}, {"walks": walks[2:]}]) == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert depth_acceptance([{"walks": []}]) is None
    setup = Setup("spd", (3, 3, 3, 3), "1", False, TreeShape(1, 1, 1), None)
    p = predict_records(flat_costs(layers=12), setup, [{"prompt_tokens": 64, "new_tokens": 1200}], 0.46, False)
    assert p["tokens_per_cycle"] == pytest.approx(1 / (1 + 0.54 * 3), rel=0.03)


def scripted_gauge(slow_at: int):
    """steady.gauge's stand-in: reads 1.0, except its `slow_at`-th reading (1.5, the slow state),
    instantly: what the gate does with it is tested, not this machine's restlessness (gated by the
    real gauge this test took 54-108 s by the hour, 40 s without)."""
    readings = []

    def gauge(model, threads, context=128, **_):
        def read():
            readings.append(threads)
            return 1.5 if len(readings) == slow_at else 1.0
        return read

    return gauge, readings


@pytest.mark.integration
def test_validate_measures_each_configuration_beside_its_predictions(tmp_path, capsys, monkeypatch):
    import torch

    from spdecode.plan import steady

    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(json.dumps({"question_id": 0, "turns": ["Name three colours of the rainbow."]}) + "\n")
    out, timed = tmp_path / "validate.json", tmp_path / "timed.json"
    configs = ["ar:threads=1", "spd:stages=2:budget=1:threads=1"]
    gauge, readings = scripted_gauge(slow_at=2)
    monkeypatch.setattr(steady, "gauge", gauge)
    threads = torch.get_num_threads()
    try:
        code, log = run_cli(capsys, "plan", "--validate", "--data", str(prompts), "--max-new-tokens", "16", "--runs",
                            "1", "--reps", "1", "--methods", ",".join(configs), "--distributed-methods", "",
                            "--json-out", str(out), "--out", str(timed))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, log[-3000:]
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["records"]}
    # run_cli reads stderr (the log); the report went to stdout, which print_validation wrote
    # again from the saved JSON below.
    print_validation(report)
    res = SimpleNamespace(stdout=capsys.readouterr().out, stderr=log)
    assert list(rows) == configs and "max relative error" in res.stdout
    # Without --costs the cost file is timed here, a round of it before each run (the guest's
    # speed drifts between a file measured before and the runs; test_plan_costs checks the
    # rounds' order), and only what these configurations use: one thread and the 2-stage draft,
    # no second process, no link, no pipeline.
    log = res.stderr
    assert log.index("costs: timing the target with 1 thread(s), round 1 of 1") < log.index("run 1 of 1"), log[-3000:]
    costs = json.loads(timed.read_text())
    assert report["costs"] == str(timed.resolve()) and report["costs_timed_between_runs"]
    assert report["runs_paired_with_rounds"] and len(report["round_costs"]) == 1
    assert "(timed between the runs)" in res.stdout
    assert list(costs["target"]) == ["1"] and list(costs["draft"]) == [f"{DEFAULT_MODEL}-n2"]
    assert "pipeline" not in costs and "link" not in costs
    for r in rows.values():
        assert r["measured_runs_tok_s"] == [r["measured_tok_s"]]
        # Timed beside the runs, on whatever CPU this is: every prediction is in reach.
        for kind in ("traces", "alpha"):
            assert 0.5 < r[f"predicted_tok_s_{kind}"] / r["measured_tok_s"] < 2.0, (r["config"], kind, r)
    # One node per slot in one process: replaying the run's own accept/reject sequence goes
    # through exactly the run's cycles.
    spd = rows["spd:stages=2:budget=1:threads=1"]
    assert spd["predicted_tokens_per_cycle_traces"] == pytest.approx(spd["measured_tokens_per_cycle"], abs=1e-9)
    assert rows["ar:threads=1"]["predicted_tokens_per_cycle_traces"] == 1.0
    # The machine's speed, probed before each run and after the last (at a thread count the file
    # timed), beside the cost file's.
    assert len(report["host_probe"]["step_s"]) == 2 and min(report["host_probe"]["step_s"]) > 0
    assert report["host_probe"]["threads"] == "1"
    assert report["host_slowdown"] > 0 and "host: an AR step" in res.stdout
    # The gate (its gauge scripted): a wait before and a check after each unit, named for what it
    # times or runs, at the table's thread count; the one slow reading (the second: the first table
    # group's check) has that group timed again, and nothing else.
    st = report["steady"]
    units = [e["what"] for e in st["events"] if e["kind"] == "wait"]
    assert units[:2] == ["the table at 1 thread(s), round 1: context 128, rows 1-4"] * 2, units
    assert any(u.startswith("the table at 1 thread(s), round 1: the head") for u in units)
    assert f"{DEFAULT_MODEL}-n2's passes at 1 thread(s), round 1" in units
    assert units[-2:] == [f"run 1: mine prompt 0: {c}" for c in configs]
    assert [e["what"] for e in st["events"] if e["kind"] == "retake"] == [units[0]]
    assert st["retaken"] == 1 and st["gave_up"] == 0 and set(readings) == {1}
    assert "1 parts or prompts taken again" in res.stdout
    # Each run of a configuration on the prompt read steady at both ends: the steady error is over them all.
    assert [r["steady_units"] for r in rows.values()] == [1, 1] and report["steady_configurations"] == 2
    assert report["max_relative_error_steady"] == pytest.approx(report["max_relative_error"], rel=1e-9)
    assert "over the prompts the gate read steady before and after (2 of 2 " in res.stdout

    # --replay predicts the saved measurements again without measuring: the cost file it saved gives
    # the same predictions; one whose target runs at half the speed halves AR's.
    def replay(costs=None):
        again = tmp_path / "again.json"
        args = ["--costs", str(costs)] if costs else []
        code, err = run_cli(capsys, "plan", "--validate", "--replay", str(out), "--json-out", str(again), *args)
        assert code == 0, err[-3000:]
        saved = json.loads(again.read_text())
        return {r["config"]: r for r in saved["records"]} | {"report": saved}

    same = replay()
    for key, r in rows.items():
        assert same[key]["predicted_tok_s_traces"] == pytest.approx(r["predicted_tok_s_traces"], rel=1e-9)
    for by_threads in costs["target"].values():
        for part in ("layer", "chunk"):  # seconds by context, then by rows
            for by_rows in by_threads[part].values():
                by_rows.update({k: 2 * v for k, v in by_rows.items()})
        for part in ("head", "step", "chunk1_in_flight"):  # by rows; by context
            by_threads[part] = {k: 2 * v for k, v in by_threads[part].items()}
    (tmp_path / "slow.json").write_text(json.dumps(costs))
    slow = replay(tmp_path / "slow.json")
    ar = "ar:threads=1"
    assert slow[ar]["predicted_tok_s_traces"] == pytest.approx(rows[ar]["predicted_tok_s_traces"] / 2, rel=0.01)
    # Against that file the host ran twice as fast as when it was "measured".
    assert slow["report"]["host_slowdown"] == pytest.approx(report["host_slowdown"] / 2, rel=1e-9)

