"""plan/calibrate.py's hops, read from a run's trace: what a waiting receiver waited after a send."""

import pytest

from spdecode.plan.calibrate import hops
from spdecode.runtime.errors import SpdError


def span(pid: int, name: str, t0_ms: float, t1_ms: float) -> dict:
    return {"name": name, "ph": "X", "pid": pid, "tid": 0, "ts": t0_ms * 1e3, "dur": (t1_ms - t0_ms) * 1e3}


def test_hops_are_what_a_waiting_receiver_waits_after_the_send_and_a_report_there_first_is_its_receive():
    events = [
        # Cycle 1: rank 0 sends at 10 ms; rank 1, waiting since 5, has the slot at 11 (a 1 ms hop).
        span(0, "send", 9.5, 10.0), span(1, "wait", 5.0, 11.0), span(1, "plan", 11.0, 11.2),
        # Rank 1 reports at 20; rank 0, waiting since 15, has it at 23 (a 3 ms hop).
        span(1, "post", 19.8, 20.0), span(0, "wait", 15.0, 23.0),
        # Cycle 2: rank 0 sends at 24, rank 1 has it at 25 (1 ms); reports at 30, but rank 0 only
        # waits from 31 and holds it at 31.5: the report was there first, 0.5 ms to take it.
        span(0, "send", 23.5, 24.0), span(1, "wait", 20.0, 25.0), span(1, "plan", 25.0, 25.1),
        span(1, "post", 29.9, 30.0), span(0, "wait", 31.0, 31.5),
        # A NONE message (no plan after the wait) is no slot's hop.
        span(0, "send", 40.0, 40.1), span(1, "wait", 30.0, 47.0), span(1, "send", 47.0, 47.1),
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "rank 0"}},
    ]
    out = hops(events)
    assert out["forward_hop_s"] == pytest.approx(1e-3)
    assert out["report_hop_s"] == pytest.approx(3e-3)
    assert out["report_recv_s"] == pytest.approx(0.5e-3)
    assert out["hops_timed"] == [2, 1, 1]


def test_a_trace_without_a_waiting_receiver_is_refused():
    with pytest.raises(SpdError, match="no slot that found its receiver waiting"):
        hops([span(0, "send", 0.0, 1.0)])
