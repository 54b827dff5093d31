"""The simulator drives the real SPD core with no model: its cycle counts must follow SPD's
theory (tau) and its clock the pipeline's message dependencies; the planner turns it into a table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spdecode.methods.schedule import tau
from spdecode.plan.planner import SHIPPED, load_costs, nearest_draft, plan
from spdecode.plan.simulate import Costs, best_split, simulate_spd
from spdecode.runtime.errors import SpdError


def flat_costs(layers=12, layer=1e-3, head=0.0, latency=0.0, grow=0.0):
    """A cost file where a layer costs `layer` s for one row and `grow` s more per extra row."""
    rows = {str(r): layer + grow * (r - 1) for r in (1, 2, 4, 8)}
    t = {"layer": {"128": rows}, "head": {str(r): head for r in (1, 2, 4, 8)}}
    return {"n_layers": layers, "target": {"1": t}, "hardware": {"cores": 64},
            "link": {"latency_s": latency, "bandwidth_bytes_per_s": 1e12}}


@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_tokens_per_cycle_follow_spds_tau(n, alpha):
    c = Costs(flat_costs(), "1")
    r = simulate_spd(c, best_split(c, n), alpha, tokens=3000, seed=1)
    assert r["tokens_per_cycle"] == pytest.approx(tau(alpha, n) / n, rel=0.05, abs=0.01)


def test_the_clock_is_the_slowest_rank_plus_the_links():
    c = Costs(flat_costs(layers=12, layer=1e-3), "1")
    # Balanced stages, free links, every draft right: one cycle per token, a cycle = one stage's time.
    r = simulate_spd(c, [6, 6], alpha=1.0, tokens=200)
    assert r["cycle_ms"] == pytest.approx(6.0, rel=0.02)
    assert all(u == pytest.approx(1.0, rel=0.03) for u in r["utilisation"])
    # An uneven split: the cycle is the slower rank's; the faster one idles.
    r = simulate_spd(c, [3, 9], alpha=1.0, tokens=200)
    assert r["cycle_ms"] == pytest.approx(9.0, rel=0.02) and r["utilisation"][0] == pytest.approx(1 / 3, rel=0.05)
    # A 1 ms link each way between the ranks lengthens every cycle by the round trip.
    slow = Costs(flat_costs(layers=12, layer=1e-3, latency=1e-3), "1")
    assert simulate_spd(slow, [6, 6], 1.0, tokens=200)["cycle_ms"] == pytest.approx(8.0, rel=0.03)
    # Drafting sits on rank 0's critical path.
    assert simulate_spd(c, [6, 6], 1.0, tokens=200, draft_s=2e-3)["cycle_ms"] == pytest.approx(8.0, rel=0.02)


def test_replayed_accepts_are_followed_exactly():
    c = Costs(flat_costs(), "1")
    all_right = simulate_spd(c, [6, 6], accepts=[True] * 500, tokens=100, alpha=0.0)
    assert all_right["alpha"] == 1.0 and all_right["tokens_per_cycle"] == pytest.approx(1.0, abs=0.02)
    none_right = simulate_spd(c, [6, 6], accepts=[False] * 500, tokens=100, alpha=1.0)
    assert none_right["alpha"] == 0.0 and none_right["tokens_per_cycle"] == pytest.approx(0.5, abs=0.02)


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
    assert [r["devices"] for r in rows] == [1, 2, 3, 4] and rows[0]["method"] == "ar" and rows[0]["speedup"] == 1.0
    assert all(r["tok_s"] > 0 for r in rows)
    better = plan(data, 2, alpha=0.9)[1]
    assert better["speedup"] > rows[1]["speedup"]  # more acceptance, more speed
    assert nearest_draft({"m-n2": {}, "m-n4": {}, "m-eagle": {}}, 3) == "m-n2"
    with pytest.raises(SpdError, match="alpha"):
        plan(data, 2, alpha=1.5)
    out = tmp_path / "p.json"
    res = subprocess.run([sys.executable, "-m", "spdecode", "plan", "--devices", "3", "--dtype", "bfloat16",
                          "--json-out", str(out), "--plot", str(tmp_path / "p.png")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "recommended:" in res.stdout and len(json.loads(out.read_text())["rows"]) == 3
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    res = subprocess.run([sys.executable, "-m", "spdecode", "plan", "--costs", str(tmp_path / "none.json")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no cost file" in res.stderr
