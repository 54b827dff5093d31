"""Timelines (runtime/trace.py, `--trace`, `spdecode plot-trace`): valid Chrome trace JSON whose
phases add up to the run's own phase timers, every rank of a distributed run on its own row, and
a PNG drawn from it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, tiny_model
from test_distributed import launch

from spdecode.bench.timeline import plot_trace
from spdecode.distributed.stage import WORK
from spdecode.drafting.pdm import new_pdm
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.methods.spd import generate_spd
from spdecode.methods.spd_core import TreeShape
from spdecode.plan.calibrate import hops
from spdecode.runtime import trace
from spdecode.runtime.errors import SpdError
from spdecode.runtime.staged import StagedTarget


@pytest.fixture
def tracing():
    yield
    trace.stop()


def test_a_single_process_trace_matches_the_runs_timers(tmp_path, tracing):
    model = tiny_model("llama")
    target = StagedTarget(model, [3, 3])
    drafter = PdmTreeDrafter(new_pdm(target, "tiny", "fp"))
    trace.start(0, "spd")
    gen = generate_spd(target, drafter, [5, 6, 7, 8], 30, shape=TreeShape(4, 2, 2))
    trace.write(tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert spans and all(e["ts"] >= 0 and e["dur"] >= 0 and e["pid"] == 0 for e in spans)
    for phase, seconds in gen.metrics.phase_s.items():
        traced = sum(e["dur"] for e in spans if e["name"] == phase) / 1e6
        assert traced == pytest.approx(seconds, rel=1e-6, abs=1e-6), phase
    marks = [e for e in data["traceEvents"] if e["ph"] == "i"]
    # One mark per verdict; together they emitted every token after the first.
    assert sum(e["args"]["tokens"] for e in marks) >= gen.metrics.new_tokens - 1
    assert {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "spd"}} in data["traceEvents"]


def test_a_distributed_trace_has_every_rank_and_plots(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps([5, 6, 7]) + "\n")
    out = tmp_path / "trace.json"
    res = launch(2, ["--model", str(tmp_path / "model"), "--stages", "3,3", "--requests", str(requests),
                     "--max-new-tokens", "20", "--json-out", str(tmp_path / "o.json"), "--trace", str(out),
                     "--tree-budget", "4", "--tree-depth", "2", "--tree-topk", "2"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    events = json.loads(out.read_text())["traceEvents"]
    by_rank = {pid: {e["name"] for e in events if e["pid"] == pid and e["ph"] == "X"} for pid in (0, 1)}
    assert {"draft", "stage0", "wait", "send"} <= by_rank[0]
    assert {"compute", "wait", "plan", "layers", "head", "post"} <= by_rank[1]  # a slot's parts: WORK
    # One clock for both rows: rank 1's stage runs while rank 0 drafts and runs stage 0 (a pipeline).
    def spans(pid, names):
        return [(e["ts"], e["ts"] + e["dur"]) for e in events if e["pid"] == pid and e.get("name") in names]

    overlap = sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in spans(1, set(WORK))
                  for b0, b1 in spans(0, {"draft", "stage0"}))
    assert overlap > 0
    # The calibration reads the hops of both directions from such a trace (plan/calibrate.py).
    # Every slot is reported and taken by rank 0 but the last of a request (in its untimed drain).
    timed = hops(events)
    slots = sum(e["pid"] == 1 and e.get("name") == "plan" for e in events)
    requests = sum(e["pid"] == 1 and e.get("name") == "compute" for e in events)
    assert timed["hops_timed"][1] + timed["hops_timed"][2] == slots - requests > 0
    assert timed["hops_timed"][0] > slots / 2  # rank 1 waits for each slot (rank 0 sends after its report)
    assert 0 < timed["forward_hop_s"] < 1.0 and 0 < timed["report_hop_s"] < 1.0
    png = plot_trace(str(out), str(tmp_path / "t.png"), cycles=5)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_trace_refuses_what_is_not_a_trace(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"events": []}')
    with pytest.raises(SpdError, match="not a trace"):
        plot_trace(str(bad), str(tmp_path / "x.png"))
    code, err = run_cli(capsys, "plot-trace", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.png"))
    assert code == 2 and err.startswith("error: cannot read the trace")


def test_tracing_off_records_nothing():
    assert not trace.active()
    trace.span("x", 0.0, 1.0)
    trace.mark("y")
    assert trace.spans() == []
    torch.manual_seed(0)
