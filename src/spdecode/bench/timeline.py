"""`spdecode plot-trace`: the first cycles of a trace (runtime/trace.py) as a per-rank timeline."""

from __future__ import annotations

import json

from ..runtime.errors import SpdError

CYCLE_ENDS = ("bookkeeping", "token", "verify")  # rank 0's last phase of a cycle, by method


def load_trace(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SpdError(f"cannot read the trace {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise SpdError(f"{path} is not a trace (no traceEvents list)")
    return data


def window_end(events: list[dict], cycles: int) -> float:
    """When rank 0's `cycles`-th cycle ends (microseconds), or the trace's end."""
    ends = sorted(e["ts"] + e["dur"] for e in events if e["pid"] == 0 and e["name"] in CYCLE_ENDS)
    last = max(e["ts"] + e.get("dur", 0) for e in events)
    return ends[cycles - 1] if len(ends) >= cycles else last


def plot_trace(path: str, out: str, cycles: int = 8) -> str:
    """Write a PNG of the first `cycles` cycles: a row per process, a bar per phase, the verdicts
    marked on rank 0's row. Returns `out`."""
    from ..runtime.errors import require_extra

    require_extra("plot", "plot-trace")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cycles < 1:
        raise SpdError(f"--cycles must be at least 1 (got {cycles})")
    data = load_trace(path)
    spans = [e for e in data["traceEvents"] if e.get("ph") == "X"]
    if not spans:
        raise SpdError(f"{path} holds no phases")
    names = {e["pid"]: e["args"]["name"] for e in data["traceEvents"] if e.get("ph") == "M"}
    # From rank 0's first phase: other ranks' rows begin earlier (waiting while rank 0 loads).
    start = min(e["ts"] for e in spans if e["pid"] == min(e["pid"] for e in spans))
    end = window_end(spans, cycles)
    pids = sorted({e["pid"] for e in spans})
    phases = sorted({e["name"] for e in spans})
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(phases)}
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.8 * len(pids)))
    row = {pid: len(pids) - 1 - i for i, pid in enumerate(pids)}
    for e in spans:
        if e["ts"] <= end and e["ts"] + e["dur"] >= start:
            t0, t1 = (max(e["ts"], start) - start) / 1e3, (min(e["ts"] + e["dur"], end) - start) / 1e3
            ax.broken_barh([(t0, t1 - t0)], (row[e["pid"]] - 0.35, 0.7), facecolors=colours[e["name"]])
    for e in data["traceEvents"]:
        if e.get("ph") == "i" and start <= e["ts"] <= end:
            x = (e["ts"] - start) / 1e3
            ax.axvline(x, color="black", lw=0.6, ls=":")
            ax.text(x, len(pids) - 0.5, e["name"], rotation=90, fontsize=6, va="top")
    ax.set_yticks([row[p] for p in pids], [names.get(p, f"pid {p}") for p in pids])
    ax.set_xlabel("ms")
    ax.set_xlim(0, (end - start) / 1e3)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in phases], labels=phases,
              loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(pids) > 1 else -0.45), ncol=len(phases),
              fontsize=8)
    ax.set_title(f"first {cycles} cycles of {path}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
