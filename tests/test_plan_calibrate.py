"""plan/calibrate.py's hops, read from a run's trace: what a waiting receiver waited after a send."""

import pytest

from spdecode.plan.calibrate import hops
from spdecode.runtime.errors import SpdError


def span(pid: int, name: str, t0_ms: float, t1_ms: float) -> dict:
    return {"name": name, "ph": "X", "pid": pid, "tid": 0, "ts": t0_ms * 1e3, "dur": (t1_ms - t0_ms) * 1e3}


def request(t: float) -> list[dict]:
    """One request of two cycles from `t` ms: rank 1's prefill, rank 0's cycle 1 (its wait is for
    the priming report) and cycle 2, each slot waited for, planned and reported by rank 1."""
    return [
        span(1, "wait", t, t + 1.0), span(1, "compute", t + 1.0, t + 3.0),  # the prefill
        span(1, "wait", t + 3.0, t + 4.0), span(1, "send", t + 4.0, t + 4.1),  # the priming NONE
        span(0, "wait", t + 5.0, t + 5.5), span(0, "send", t + 9.5, t + 10.0),  # cycle 1
        # Rank 1, waiting since t + 4.1, has the slot 1 ms after rank 0's send; reports at t + 20.
        span(1, "wait", t + 4.1, t + 11.0), span(1, "plan", t + 11.0, t + 11.2), span(1, "post", t + 19.8, t + 20.0),
        # Cycle 2: rank 0, waiting since t + 15, has the report at t + 23 (a 3 ms hop).
        span(0, "wait", t + 15.0, t + 23.0), span(0, "send", t + 23.5, t + 24.0),
        # Rank 1 has slot 2 before rank 0's lap ends (the send was out): a hop of 0; its report is
        # taken in the request's drain, untimed.
        span(1, "wait", t + 20.1, t + 23.9), span(1, "plan", t + 23.9, t + 24.1), span(1, "post", t + 29.9, t + 30.0),
    ]


def test_hops_pair_each_slot_and_report_within_a_request():
    # The second request's cycle-2 report was there first: rank 0 only waits from +24, 0.5 ms.
    second = [e for e in request(100.0) if not (e["pid"] == 0 and e["name"] == "wait" and e["ts"] == 115e3)]
    second.append(span(0, "wait", 121.0, 121.5))
    out = hops(request(0.0) + second + [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0}])
    assert out["hops_timed"] == [4, 1, 1]
    assert out["forward_hop_s"] == pytest.approx((1.0 + 0.0) / 2 * 1e-3)
    assert out["report_hop_s"] == pytest.approx(3e-3)
    assert out["report_recv_s"] == pytest.approx(0.5e-3)


def test_a_trace_that_is_not_one_pipeline_is_refused():
    with pytest.raises(SpdError, match="no slot that found its receiver waiting"):
        hops([span(0, "send", 0.0, 1.0)])
    lost = [e for e in request(0.0) if not (e["pid"] == 1 and e["name"] == "post" and e["ts"] == 29.9e3)]
    with pytest.raises(SpdError, match="not one pipeline's"):
        hops(lost)
