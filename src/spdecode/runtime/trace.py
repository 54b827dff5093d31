"""A timeline of a run in Chrome's trace-event format (opens in Perfetto / chrome://tracing).

Tracing is switched on for a process (`start()`), like a profiler: every phase a `metrics.Clock`
times becomes a complete event ("ph": "X") on this process's row, and verdicts become instant
events. Ranks of a distributed run each record their own and rank 0 merges them (`add`); their
clocks agree because perf_counter is the host's monotonic clock (one host: across hosts the
rows are offset by the hosts' clock difference). Times are microseconds from the first event.
"""

from __future__ import annotations

import json
import time

_events: list[dict] | None = None  # None: not tracing
_pid = 0
_names: dict[int, str] = {}


def start(pid: int = 0, name: str = "main") -> None:
    global _events, _pid
    _events, _pid = [], pid
    _names[pid] = name


def stop() -> None:
    """Stop recording (what was recorded is dropped)."""
    global _events
    _events = None
    _names.clear()


def active() -> bool:
    return _events is not None


def span(name: str, t0: float, t1: float, pid: int | None = None, args: dict | None = None) -> None:
    """A phase from perf_counter t0 to t1."""
    if _events is not None:
        ev = {"name": name, "ph": "X", "ts": t0 * 1e6, "dur": max(t1 - t0, 0.0) * 1e6,
              "pid": _pid if pid is None else pid, "tid": 0}
        if args:
            ev["args"] = args
        _events.append(ev)


def mark(name: str, args: dict | None = None, at: float | None = None) -> None:
    """An instant (a verdict: accepted tokens, a correction), now or `at` (seconds on the clock of
    the spans: a simulated run's)."""
    if _events is not None:
        ts = time.perf_counter() if at is None else at
        _events.append({"name": name, "ph": "i", "s": "p", "ts": ts * 1e6, "pid": _pid, "tid": 0, "args": args or {}})


def spans() -> list[tuple[str, float, float]]:
    """This process's phases as (name, start s, end s): what a rank sends to rank 0."""
    return [(e["name"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in _events or [] if e["ph"] == "X"]


def add(pid: int, name: str, phases: list[tuple[str, float, float]]) -> None:
    """Another process's phases (a rank's), on its own row."""
    _names[pid] = name
    for n, t0, t1 in phases:
        span(n, t0, t1, pid)


def write(path: str) -> None:
    """The trace as JSON; times start at 0 at the first event."""
    events = list(_events or [])
    origin = min((e["ts"] for e in events), default=0.0)
    for e in events:
        e["ts"] -= origin
    meta = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}}
            for pid, name in sorted(_names.items())]
    with open(path, "w") as f:
        json.dump({"traceEvents": meta + events, "displayTimeUnit": "ms"}, f)
