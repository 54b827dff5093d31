"""The simulator drives the real engine core with no model: its cycle counts must follow the
theory of each method (SPD's tau, speculative decoding's expected tokens per pass), a replayed
accept/reject sequence must give a real run's cycles exactly, and its clock must follow the
pipeline's message dependencies or, in one process, the sum of the stages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import ReferenceDrafter
from test_spd_core import P, run_once

from spdecode.cli import main
from spdecode.drafting.tree_build import grow_below, tree_starts
from spdecode.methods.ar import generate_ar
from spdecode.methods.schedule import tau
from spdecode.methods.spd import generate_spd
from spdecode.methods.spd_core import TreeShape
from spdecode.plan.cost_model import Costs
from spdecode.plan.planner import SHIPPED, load_costs, load_walks, nearest_draft, plan
from spdecode.plan.simulate import Drawn, Replayed, best_split, depth_of, simulate
from spdecode.runtime.errors import SpdError
from spdecode.runtime.staged import StagedTarget


def flat_costs(layers=12, layer=1e-3, head=0.0, latency=0.0, grow=0.0):
    """A cost file where a layer costs `layer` s for one row and `grow` s more per extra row."""
    rows = {str(r): layer + grow * (r - 1) for r in (1, 2, 4, 8, 16)}
    t = {"layer": {"128": rows}, "head": {str(r): head for r in (1, 2, 4, 8, 16)}}
    return {"n_layers": layers, "target": {"1": t}, "hardware": {"cores": 64},
            "link": {"latency_s": latency, "bandwidth_bytes_per_s": 1e12}}


@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_tokens_per_cycle_follow_spds_tau(n, alpha):
    c = Costs(flat_costs(), "1")
    r = simulate(c, best_split(c, n), Drawn(alpha, seed=1), tokens=3000)
    assert r["tokens_per_cycle"] == pytest.approx(tau(alpha, n) / n, rel=0.05, abs=0.01)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.8])
@pytest.mark.parametrize("gamma", [2, 4])
def test_a_chain_of_gamma_drafts_gives_speculative_decodings_expected_tokens(alpha, gamma):
    """Classic SD (Leviathan et al.): with i.i.d. acceptance alpha a pass yields (1 - a^(g+1)) / (1 - a)."""
    c = Costs(flat_costs(), "1")
    r = simulate(c, [12], Drawn(alpha, seed=2), TreeShape(gamma, gamma, 1), tokens=4000)
    expected = gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    assert r["tokens_per_cycle"] == pytest.approx(expected, rel=0.05)


def test_a_tree_verifies_its_depth_when_every_draft_is_right_and_one_token_when_none_is():
    c = Costs(flat_costs(), "1")
    # Chains of 1, 3 and 5 nodes, and a wide tree (best-first keeps its best path 3 deep in 8 nodes).
    for depth, tree in ((1, TreeShape(2, 1, 1)), (3, TreeShape(3, 3, 1)), (5, TreeShape(5, 5, 1)),
                        (3, TreeShape(8, 3, 4))):
        assert simulate(c, [12], Drawn(1.0), tree, tokens=300)["tokens_per_cycle"] == pytest.approx(depth + 1, rel=0.02)
        assert simulate(c, [12], Drawn(0.0), tree, tokens=300)["tokens_per_cycle"] == 1.0
    # Acceptance by depth: the walk stops where the first depth that is never right begins.
    assert simulate(c, [12], Drawn([1.0, 1.0, 0.0]), TreeShape(8, 4, 4), tokens=300)["tokens_per_cycle"] == \
        pytest.approx(3.0, rel=0.02)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 10_000), p=st.floats(0, 1))
def test_replaying_a_runs_walks_gives_its_cycles_exactly(n, seed, p):
    """One node per slot: a real run of the core (scripted drafts, right at random) and the
    simulator replaying that run's accept/reject sequence go through the same cycles."""
    import random

    rng = random.Random(seed)
    right = {pos: rng.random() < p for pos in range(P, P + 60)}
    gen = run_once(n, right)[0]
    walks = gen.metrics.walks
    if not any(w[0] for w in walks):  # nothing was ever verified: no trace to replay
        return
    c = Costs(flat_costs(), "1")
    sizes = best_split(c, n) if n > 1 else [12]
    r = simulate(c, sizes, Replayed(walks), tokens=gen.metrics.new_tokens, prompt=P, distributed=False)
    assert r["cycles"] == gen.metrics.cycles and r["alpha"] == gen.metrics.alpha


class NoisyTreeDrafter:
    """Trees grown as every tree drafter grows them (tree_build.grow_below) from noisy
    distributions that lean toward the target's greedy token: it lands at random ranks among the
    children, so walks step into siblings other than the drafter's best."""

    method, after_stage0, anchors = "spd", False, []

    def __init__(self, expected: list[int], vocab: int, seed: int, step: float = 0.0):
        """`step`: log-probabilities rounded to multiples of it (ties, as a bf16 drafter's have)."""
        self.expected, self.vocab, self.step = expected, vocab, step
        self.rng = torch.Generator().manual_seed(seed)

    def reset(self, run):
        pass

    def grow(self, run, now):
        sched = run.sched
        starts = tree_starts(run, [i for i in sched.live() if not now or i not in sched.drafted])

        def expand(grown, frontier):
            out = torch.randn(len(frontier), self.vocab, generator=self.rng)
            for row, (kind, r) in enumerate(frontier):
                if kind == "leaf":
                    position, token = sched.nodes[r].position, sched.nodes[r].token
                    out[row, [sched.nodes[c].token for c in sched.live_children(r)]] = float("-inf")
                else:
                    position, token = sched.nodes[grown[r].leaf].position + depth_of(grown, r), grown[r].token
                if position + 1 < len(self.expected) and token == self.expected[position]:
                    out[row, self.expected[position + 1]] += 2.0
            logprobs = torch.log_softmax(out, dim=-1)
            return (logprobs / self.step).round() * self.step if self.step else logprobs

        if starts:
            grow_below(run, starts, expand, None, now)


SPD_TREE, NARROW = TreeShape(8, 2, 4), TreeShape(3, 3, 2)


@pytest.mark.parametrize("n, shape, step", [(n, shape, 0.0) for n in (1, 2, 4) for shape in (SPD_TREE, NARROW)]
                         + [(2, SPD_TREE, 0.25), (4, SPD_TREE, 0.25)])
def test_replaying_a_runs_walks_and_draft_scores_gives_its_tree_cycles_exactly(n, shape, step):
    """Trees: a real run of a tiny model whose walks step into siblings other than the drafter's
    best, replayed from its walks and its drafter's scores, goes through the same cycles, in one
    process and in a pipeline (stepping into the best child of the stand-in's own trees put
    spd's tokens per cycle 3 % over the measured). A walk that ends at a leaf reads its depth's
    outcome too, or the next walk reads it. Tied scores (`step`) rank in the children's order on
    both sides (ranked by count of better siblings, one of four bf16 generations replayed 15 % off)."""
    model = tiny_model("llama")
    prompt = [5, 17, 42, 8, 33, 71, 9]
    ref = generate_ar(StagedTarget(model), prompt, 60).tokens
    target = StagedTarget(model, n)
    gen = generate_spd(target, NoisyTreeDrafter(prompt + ref, 97, seed=n, step=step), prompt, 60, shape=shape)
    m = gen.metrics
    assert gen.tokens == ref and m.drafts_accepted > 10
    assert any(rank > 0 for w in m.walks for rank in w[3])
    c = Costs(flat_costs(layers=model.config.num_hidden_layers), "1")
    for distributed in (False, True):
        r = simulate(c, target.stage_sizes, Replayed(m.walks, m.draft_scores), shape, distributed=distributed,
                     tokens=m.new_tokens, prompt=len(prompt))
        assert (r["cycles"], r["tokens_per_cycle"]) == (m.cycles, m.tokens_per_cycle)


def test_replayed_accepts_are_followed_exactly():
    c = Costs(flat_costs(), "1")
    all_right = simulate(c, [6, 6], Replayed([[1, 1]] * 5), tokens=100)
    assert all_right["alpha"] == 1.0 and all_right["tokens_per_cycle"] == pytest.approx(1.0, abs=0.02)
    none_right = simulate(c, [6, 6], Replayed([[1, 0]]), tokens=100)
    assert none_right["alpha"] == 0.0 and none_right["tokens_per_cycle"] == pytest.approx(0.5, abs=0.02)
    # A tree's sibling ranks are followed only beside the scores that grow the same trees.
    assert Replayed([[2, 2, 0, [2, 1]]], scores=[[-0.5]]).next(1) == 1
    assert Replayed([[2, 2, 0, [2, 1]]]).next(1) == 0
    with pytest.raises(SpdError, match="no verification"):
        Replayed([[0, 0]])
    with pytest.raises(SpdError, match="acceptance"):
        Drawn(1.5)


def test_the_clock_is_the_slowest_rank_plus_the_links():
    c = Costs(flat_costs(layers=12, layer=1e-3), "1")
    # Balanced stages, free links, every draft right: one cycle per token, a cycle = one stage's time.
    r = simulate(c, [6, 6], Drawn(1.0), tokens=200)
    assert r["cycle_ms"] == pytest.approx(6.0, rel=0.02)
    assert all(u == pytest.approx(1.0, rel=0.03) for u in r["utilisation"])
    # An uneven split: the cycle is the slower rank's; the faster one idles.
    r = simulate(c, [3, 9], Drawn(1.0), tokens=200)
    assert r["cycle_ms"] == pytest.approx(9.0, rel=0.02) and r["utilisation"][0] == pytest.approx(1 / 3, rel=0.05)
    # A 1 ms link each way between the ranks lengthens every cycle by the round trip.
    slow = Costs(flat_costs(layers=12, layer=1e-3, latency=1e-3), "1")
    assert simulate(slow, [6, 6], Drawn(1.0), tokens=200)["cycle_ms"] == pytest.approx(8.0, rel=0.03)
    # Drafting (one pass a cycle for one node per slot) and the core's bookkeeping sit on rank 0's path.
    assert simulate(c, [6, 6], Drawn(1.0), tokens=200, draft_pass=lambda rows: 2e-3)["cycle_ms"] == \
        pytest.approx(8.0, rel=0.02)
    assert simulate(c, [6, 6], Drawn(1.0), tokens=200, cycle_s=1e-3)["cycle_ms"] == pytest.approx(7.0, rel=0.02)


def test_a_calibrated_pipeline_charges_each_ranks_work_per_slot_and_its_shared_core_ratios():
    """A real rank does work per slot beyond its layers (plan, compaction, posting; plan/calibrate.py):
    each busy slot of a stage rank costs it, and rank 0's settle-and-send per cycle, which comes
    after the last rank's report. The ratios measured with two ranks on one machine's cores apply
    only to configurations that share them."""
    base = flat_costs(layers=12, layer=1e-3)
    calibrated = {**base, "pipeline": {"rows": [1, 9], "root_rows": [1, 9], "stage_slot_s": [1e-3, 3e-3],
                                       "root_send_s": [0.5e-3, 0.5e-3], "stage_layers_ratio": [1.5, 1.5],
                                       "stage_head_ratio": [1.0, 1.0], "root_stage0_ratio": [1.0, 1.0]}}
    calibrated["target"]["1 concurrent"] = calibrated["target"]["1"]
    plain = simulate(Costs(base, "1"), [6, 6], Drawn(1.0), tokens=200)["cycle_ms"]
    # Separate machines: rank 1's 6 ms of layers and 1 ms per slot, then rank 0's 0.5 ms to send on.
    assert simulate(Costs(calibrated, "1"), [6, 6], Drawn(1.0), tokens=200)["cycle_ms"] == \
        pytest.approx(plain + 1.5, rel=0.02)
    # Sharing the cores as the calibration run did: rank 1's layers take 1.5 times the table's.
    assert simulate(Costs(calibrated, "1 concurrent"), [6, 6], Drawn(1.0), tokens=200)["cycle_ms"] == \
        pytest.approx(9.0 + 1.0 + 0.5, rel=0.02)


def test_hops_seen_in_the_calibration_run_apply_where_the_ranks_share_the_cores():
    """Messages between busy processes on shared cores hop slower than an idle ping-pong: the
    calibrated hops replace the link there, twice a cycle (slot down, report back); rank 0's
    receive of a report that came first costs it on every machine."""
    base = flat_costs(layers=12, layer=1e-3)
    timed = {"rows": [1, 9], "root_rows": [1, 9], "stage_slot_s": [0.0, 0.0], "root_send_s": [0.0, 0.0],
             "stage_layers_ratio": [1.0, 1.0], "stage_head_ratio": [1.0, 1.0], "root_stage0_ratio": [1.0, 1.0]}
    hops = {"forward_hop_s": [1e-3, 1e-3], "report_hop_s": [2e-3, 2e-3], "report_recv_s": [0.5e-3, 0.5e-3]}
    calibrated = {**base, "pipeline": timed | hops}
    calibrated["target"]["1 concurrent"] = calibrated["target"]["1"]
    # Shared cores: rank 1 starts 1 ms after rank 0 sent, reports 2 ms after its 6 ms.
    assert simulate(Costs(calibrated, "1 concurrent"), [6, 6], Drawn(1.0), tokens=200)["cycle_ms"] == \
        pytest.approx(1.0 + 6.0 + 2.0, rel=0.02)
    # Separate machines (free links): rank 0's 6 ms and its receive of the report that was there.
    assert simulate(Costs(calibrated, "1"), [6, 6], Drawn(1.0), tokens=200)["cycle_ms"] == \
        pytest.approx(6.5, rel=0.02)
    # A calibration from before the hops were timed: the link's message cost, as before.
    older = {**base, "pipeline": timed}
    older["target"]["1 concurrent"] = older["target"]["1"]
    assert simulate(Costs(older, "1 concurrent"), [6, 6], Drawn(1.0), tokens=200)["cycle_ms"] == \
        pytest.approx(6.0, rel=0.02)


def test_one_process_runs_its_stages_one_after_another():
    c = Costs(flat_costs(layers=12, layer=1e-3, grow=1e-4), "1")
    # Every stage busy with one row each cycle: the cycle is all of them.
    assert simulate(c, [6, 6], Drawn(1.0), tokens=200, distributed=False)["cycle_ms"] == pytest.approx(12.0, rel=0.02)
    # n = 1 with a tree: one pass over the root and its 8 nodes (12 layers at 9 rows), and each
    # level of the tree below the first costs a drafter pass.
    r = simulate(c, [12], Drawn(0.0), TreeShape(8, 3, 4), tokens=400, draft_pass=lambda rows: 1e-3)
    nine_rows = 1e-3 + 8 * 1e-4
    assert r["cycle_ms"] == pytest.approx(1e3 * (12 * nine_rows + 3e-3), rel=0.03)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_one_row_behind_rows_in_flight_is_charged_where_the_engine_runs_it(n, monkeypatch):
    """A one-row stage call behind rows in flight takes the masked path (chunk1_in_flight), dearer
    than the table's lone row: the simulator charges it for exactly the calls where a real
    one-process run of a tiny model took it (counted in the engine's stage calls), its walks replayed."""
    model = tiny_model("llama")
    prompt = [5, 17, 42, 8, 33, 71, 9]
    ref = generate_ar(StagedTarget(model), prompt, 40).tokens
    calls, stage_call = [], StagedTarget.run_stage_chunk

    def counted(self, stage, hidden, layout, capture=None):
        lo, hi = self.stage_bounds[stage]
        calls.append((hidden.shape[1], layout.committed < layout.start, hi - lo))
        return stage_call(self, stage, hidden, layout, capture)

    monkeypatch.setattr(StagedTarget, "run_stage_chunk", counted)
    target = StagedTarget(model, n)
    gen = generate_spd(target, ReferenceDrafter(prompt, ref, 97, 0.5, seed=n), prompt, 40)
    behind = sum(layers for rows, in_flight, layers in calls if rows == 1 and in_flight)
    data = flat_costs(layers=model.config.num_hidden_layers, layer=0.0)
    data["target"]["1"]["chunk1_in_flight"] = {"128": 1.0}  # seconds per layer: the clock counts them
    r = simulate(Costs(data, "1"), target.stage_sizes, Replayed(gen.metrics.walks), tokens=gen.metrics.new_tokens,
                 prompt=len(prompt), distributed=False)
    # At two stages the row ahead of a slot is verified before the slot runs: never behind one in flight.
    assert (behind > 0) == (n > 2) and r["cycles"] == gen.metrics.cycles
    assert r["decode_s"] == pytest.approx(behind)


def test_the_cost_model_reads_rows_and_context_between_timed_points():
    data = flat_costs(layers=2, layer=1e-3, grow=1e-4)
    data["target"]["1"]["layer"]["512"] = {r: 2 * v for r, v in data["target"]["1"]["layer"]["128"].items()}
    data["target"]["1"]["step"] = {"128": 2e-3 + 2 * 1e-4, "512": 4e-3 + 2 * 1e-4}
    assert Costs(data, "1", context=128).layer(3) == pytest.approx(1.2e-3)
    assert Costs(data, "1", context=320).layer(1) == pytest.approx(1.5e-3)  # halfway in context
    assert Costs(data, "1", context=4096).layer(1) == pytest.approx(2e-3)  # held flat past the last timing
    assert Costs(data, "1", context=128).overhead == pytest.approx(1e-4)  # a step beyond its layers and head
    assert Costs(data, "1").layer(32) == pytest.approx(2 * (1e-3 + 1.5e-3))  # proportional past 16 rows
    with pytest.raises(SpdError, match="no timings"):
        Costs(data, "2")


def test_best_split_gives_the_drafter_and_the_head_fewer_layers():
    c = Costs(flat_costs(layers=12, layer=1e-3, head=3e-3), "1")
    assert best_split(c, 2, draft_s=1e-3) == [7, 5]
    assert best_split(c, 3) == [5, 5, 2]
    with pytest.raises(SpdError, match="stages for"):
        best_split(c, 13)


def test_the_planner_on_the_shipped_costs(tmp_path):
    data, source = load_costs(None, "smollm2-135m", "bfloat16")
    assert source.startswith(str(SHIPPED))
    rows = plan(data, 4, alpha=0.45)
    assert [(r["method"], r["devices"]) for r in rows] == [("ar", 1), ("eagle", 1)] + [
        ("spd", n) for n in (2, 2, 3, 3, 4, 4)]
    assert rows[0]["speedup"] == 1.0 and all(r["tok_s"] > 0 for r in rows)
    assert {r["config"].split(", ")[-1] for r in rows[2:]} == {"one node per slot", "tree 8:2:4"}
    better = plan(data, 2, alpha=0.9, needs=False)
    assert all(b["speedup"] > r["speedup"] for b, r in zip(better[1:], rows[1:4], strict=True))  # more acceptance
    assert nearest_draft({"m-n2": {}, "m-n4": {}, "m-eagle": {}}, 3) == "m-n2"
    assert nearest_draft({"m-n2": {}, "m-n2-tree": {}, "m-eagle": {}}, 2, "tree") == "m-n2-tree"
    assert nearest_draft({"m-n2": {}, "m-eagle": {}}, 1, "eagle") == "m-eagle"
    with pytest.raises(SpdError, match="alpha"):
        plan(data, 2, alpha=1.5)
    # What SPD over trees needs to pay: at that acceptance it reaches AR (eagle), a step below it does not.
    for r in rows[2:]:
        if "alpha_to_beat_ar" not in r:
            continue
        sizes = tuple(int(x) for x in r["config"].split(", ")[0].split()[1].split(","))
        at = {a: plan_one(data, sizes, a, devices=4) for a in (r["alpha_to_beat_ar"], r["alpha_to_beat_ar"] - 1 / 128)}
        assert at[r["alpha_to_beat_ar"]] >= rows[0]["tok_s"] > at[r["alpha_to_beat_ar"] - 1 / 128]
        assert r["alpha_to_beat_eagle"] is None or r["alpha_to_beat_eagle"] >= r["alpha_to_beat_ar"]
    # Eight devices: every depth of pipeline, trees too (a node collects children from many slots).
    deep = plan(data, 8, 0.45, link="10gbe", needs=False)
    assert [r["devices"] for r in deep][-2:] == [8, 8] and all(r["tok_s"] > 0 for r in deep)
    # A slower link costs a pipeline time where it is on the path: NVLink-like links beat 10 GbE
    # for one node per slot on separate devices. (Ranks that share this machine's cores hop as the
    # calibration run measured, whatever the link; a tree's pipeline here waits on its ranks.)
    fast, slow = plan(data, 4, 0.45, link="nvlink", needs=False), plan(data, 4, 0.45, link="10gbe", needs=False)
    assert all(f["tok_s"] >= s["tok_s"] for f, s in zip(fast, slow, strict=True))
    assert all(f["tok_s"] > s["tok_s"] for f, s in zip(fast, slow, strict=True)
               if f["method"] == "spd" and "one node per slot" in f["config"])


def plan_one(data, sizes, alpha, devices):
    """The planner's prediction for SPD over spd's default tree on `sizes`, at `alpha`, when it
    plans for `devices` (ranks share this machine's cores when they are no more than its cores)."""
    from spdecode.generators import MethodOptions
    from spdecode.plan.cost_model import CONCURRENT
    from spdecode.plan.planner import PROMPT, nearest_draft
    from spdecode.plan.predict import Setup, predict

    shape = TreeShape(*MethodOptions().tree("spd"))
    threads = CONCURRENT if devices <= data["hardware"]["cores"] else "1"
    name = nearest_draft(Costs(data, threads).draft, len(sizes), "tree")
    return predict(data, Setup("spd", sizes, threads, True, shape, name), Drawn(alpha), PROMPT, 256)["tok_s"]


def test_plan_replays_the_walks_of_a_bench_or_eval_draft_json(tmp_path):
    traces = tmp_path / "bench.json"
    traces.write_text(json.dumps({"records": [{"walks": [[1, 1]] * 40}, {"walks": [[1, 1]] * 10}]}))
    assert len(load_walks(str(traces))) == 50
    data, _ = load_costs(None, "smollm2-135m", "float32")
    rows = plan(data, 2, alpha=0.0, walks=load_walks(str(traces)), traces=str(traces))
    one_node = rows[2]
    assert one_node["tokens_per_cycle"] == pytest.approx(1.0, abs=0.02) and "replayed" in one_node["acceptance"]
    (tmp_path / "old.json").write_text(json.dumps({"records": [{"alpha": 0.5}]}))
    with pytest.raises(SpdError, match="no walks"):
        load_walks(str(tmp_path / "old.json"))
    with pytest.raises(SpdError, match="not the JSON"):
        load_walks(str(tmp_path / "missing.json"))


def test_plan_on_the_command_line(tmp_path, capsys, no_loading):
    out = tmp_path / "p.json"
    validated = tmp_path / "validate.json"  # what plan --validate measured: marked apart from the simulated rows
    rec = {"config": "spd:budget=1 (2 proc)", "method": "spd", "stages": [16, 14], "distributed": True,
           "tree": [1, 1, 1], "measured_tok_s": 30.0, "predicted_tok_s_alpha": 33.0, "alpha": 0.5}
    validated.write_text(json.dumps({"records": [{**rec, "config": "ar:threads=2", "method": "ar", "stages": [30],
                                                  "distributed": False, "tree": None, "measured_tok_s": 40.0}, rec]}))
    res = subprocess.run([sys.executable, "-m", "spdecode", "plan", "--devices", "3", "--dtype", "bfloat16",
                          "--json-out", str(out), "--plot", str(tmp_path / "p.png"), "--measured", str(validated)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "recommended:" in res.stdout and len(json.loads(out.read_text())["rows"]) == 6
    assert "every row below is simulated" in res.stdout and "2 process(es), spd:budget=1 (2 proc): 30.0 tok/s " \
        "measured (0.75x the best AR measured)" in res.stdout
    assert "acceptance per depth SPD over trees needs" in res.stdout
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    for args, message in ((["--costs", str(tmp_path / "none.json")], "no cost file"),
                          (["--validate", "--measure"], "drop --measure"),
                          (["--validate", "--costs", str(out), "--out", str(out)], "with --costs or --replay"),
                          (["--validate", "--runs", "0"], "--runs must be at least 1"),
                          (["--validate", "--reps", "0"], "--reps must be at least 1"),
                          (["--validate", "--methods", "", "--distributed-methods", ""], "nothing to validate"),
                          (["--validate", "--distributed-methods", "ar"], "runs pipelines"),
                          (["--validate", "--out", str(tmp_path / "no" / "c.json")], "no such directory"),
                          (["--dtype", "float16"], "no shipped cost file"),
                          (["--measured", str(tmp_path / "p.png")], "not the JSON of `spdecode plan --validate")):
        # In this process (each its own interpreter took seconds): refused before any model loads.
        code = main(["plan", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)


def test_a_simulated_run_is_drawn_like_a_measured_one(tmp_path):
    """The simulator's timeline is a trace in `generate --trace`'s format: both ranks' phases on
    the simulated clock, rank 1's compute adding up to its utilisation, verdicts marked."""
    from spdecode.bench.timeline import load_trace, plot_trace
    from spdecode.plan.simulate import write_timeline

    c = Costs(flat_costs(layers=12, layer=1e-3, latency=2e-4), "1")
    r = simulate(c, [5, 7], Drawn(0.5, seed=3), tokens=60, timeline=True, draft_pass=lambda rows: 1e-3)
    path = tmp_path / "sim.json"
    write_timeline(str(path), r["events"], 2)
    events = load_trace(str(path))["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    assert {(e["pid"], e["name"]) for e in spans} >= {(0, "draft"), (0, "stage0"), (0, "wait"), (1, "compute")}
    compute = sum(e["dur"] for e in spans if e["pid"] == 1 and e["name"] == "compute") / 1e6
    assert compute == pytest.approx(r["utilisation"][1] * r["decode_s"], rel=1e-6)
    assert max(e["ts"] + e["dur"] for e in spans) / 1e6 == pytest.approx(r["decode_s"], rel=1e-6)
    marks = [e["name"] for e in events if e.get("ph") == "i"]
    assert any("correction" in m for m in marks) and any(m == "accept 1" for m in marks)
    assert plot_trace(str(path), str(tmp_path / "sim.png"), cycles=6)
    assert (tmp_path / "sim.png").read_bytes()[:4] == b"\x89PNG"
    # The planner writes its best configuration's run the same way.
    data, _ = load_costs(None, "smollm2-135m", "bfloat16")
    plan(data, 2, 0.45, timeline=str(tmp_path / "best.json"))
    assert load_trace(str(tmp_path / "best.json"))["traceEvents"]


@pytest.mark.parametrize("drafter_layers", [None, 1])  # the target itself (every draft right), its first layer
def test_sds_draft_model_is_charged_the_rows_it_runs(drafter_layers, monkeypatch):
    """sd's chain is drafted by a model over its own cache, which runs only the tokens new to it:
    the correction after a rejection, the last draft and the bonus token after a full accept. The
    simulator charges the passes a real generation of a tiny model ran (its walks replayed), after
    the drafter's first pass over the prompt; the engine's drafters' accounting (the verified
    tokens and the root again) does not match them."""
    from spdecode.drafting.candidates import ModelCandidates
    from spdecode.methods.sd import generate_sd

    model = tiny_model("llama", num_hidden_layers=3)
    prompt, gamma = [5, 17, 42, 8, 33, 71, 9], 4
    drafter = ModelCandidates(model, drafter_layers)
    real, run_layers = [], StagedTarget.run_layers

    def counted(self, lo, hi, hidden, *args, **kwargs):
        if self is drafter.lm.t:
            real.append(hidden.shape[1])
        return run_layers(self, lo, hi, hidden, *args, **kwargs)

    monkeypatch.setattr(StagedTarget, "run_layers", counted)
    gen = generate_sd(StagedTarget(model), drafter, prompt, 30, gamma=gamma)
    monkeypatch.setattr(StagedTarget, "run_layers", run_layers)
    full = sum(1 for verified, accepted in gen.metrics.walks if accepted == verified == gamma)
    assert real[0] == len(prompt) + 1 and (full > 0) == (drafter_layers is None)

    def charged(own_cache):
        rows = []
        r = simulate(Costs(flat_costs(layers=3), "1"), [3], Replayed(gen.metrics.walks), TreeShape(gamma, gamma, 1),
                     distributed=False, draft_pass=lambda n: rows.append(n) or 0.0, tokens=gen.metrics.new_tokens,
                     prompt=len(prompt), own_cache=own_cache)
        assert r["cycles"] == gen.metrics.cycles
        return rows

    # To the last cycles, where sd drafts only as many as tokens remain.
    assert charged(True)[1:] == real[1:]
    assert charged(False)[1:len(real)] != real[1:]
