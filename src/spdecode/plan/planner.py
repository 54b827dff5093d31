"""`spdecode plan --devices K`: predicted tok/s per method and configuration from a cost file.

AR runs on one device at its best thread count; SPD (one node per slot) on n = 2..K devices,
each n with its best split (distributed.balance: rank 0 carries the drafter, the last rank the
head), the link from the cost file or a preset. Acceptance is a given alpha (the output says so).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..runtime.errors import SpdError
from .costs import CONCURRENT
from .simulate import Costs, best_split, simulate_spd

SHIPPED = Path(__file__).parent / "costs"
# (latency s, bandwidth bytes/s) of common links
LINKS = {"same-host": None, "pcie": (5e-6, 25e9), "nvlink": (2e-6, 300e9), "10gbe": (50e-6, 1.25e9),
         "100gbe": (10e-6, 12.5e9)}


def load_costs(path: str | None, model: str, dtype: str) -> tuple[dict, str]:
    """The cost file given, else the one shipped for this model and dtype (measured on the 2-core CPU)."""
    p = Path(path) if path else SHIPPED / f"{model}-{dtype}-cpu-2core.json"
    if not p.exists():
        raise SpdError(f"no cost file {p}: measure one with `spdecode plan --measure --out FILE`"
                       if path else f"no shipped cost file for {model} in {dtype}: give --costs")
    try:
        return json.loads(p.read_text()), str(p)
    except json.JSONDecodeError as exc:
        raise SpdError(f"{p} is not a cost file: {exc}") from None


def plan(data: dict, devices: int, alpha: float, link: str = "same-host", draft: str | None = None,
         tokens: int = 256) -> list[dict]:
    if devices < 1:
        raise SpdError(f"--devices must be at least 1 (got {devices})")
    if not 0.0 <= alpha <= 1.0:
        raise SpdError(f"--alpha must be in [0, 1] (got {alpha})")
    if link not in LINKS:
        raise SpdError(f"unknown link {link!r}; choose from {', '.join(LINKS)}")
    keys = [k for k in data["target"] if k.isdigit()]
    ar_threads = min(keys, key=lambda k: Costs(data, k).ar_token())
    ar = Costs(data, ar_threads).ar_token()
    rows = [{"method": "ar", "devices": 1, "config": f"{ar_threads} thread(s)", "tok_s": 1 / ar, "speedup": 1.0,
             "tokens_per_cycle": 1.0, "acceptance": "-"}]
    rank_threads = CONCURRENT if CONCURRENT in data["target"] and devices <= data["hardware"]["cores"] else "1"
    costs = Costs(data, rank_threads)
    if LINKS[link] is not None:
        costs.link = {"latency_s": LINKS[link][0], "bandwidth_bytes_per_s": LINKS[link][1]}
    for n in range(2, min(devices, costs.layers) + 1):
        name = draft or nearest_draft(costs.draft, n)
        draft_s = costs.draft[name][1] if name in costs.draft else 0.0
        sizes = best_split(costs, n, draft_s)
        r = simulate_spd(costs, sizes, alpha, tokens=tokens, draft_s=draft_s)
        rows.append({"method": "spd", "devices": n, "config": f"stages {','.join(map(str, sizes))}",
                     "tok_s": r["tok_s"], "speedup": r["tok_s"] * ar, "tokens_per_cycle": r["tokens_per_cycle"],
                     "acceptance": f"alpha {alpha:.2f} given", "utilisation": r["utilisation"],
                     "drafter_cost_from": name if name in costs.draft else "none (0 s)"})
    return rows


def nearest_draft(drafts: dict, n: int) -> str | None:
    """The timed one-node draft (`<model>-n<N>`) whose N is nearest to n: its cost stands in."""
    import re

    by_n = {int(m.group(1)): d for d in drafts if (m := re.search(r"-n(\d+)$", d))}
    return by_n[min(by_n, key=lambda k: (abs(k - n), k))] if by_n else None


def print_plan(rows: list[dict], source: str, link: str) -> None:
    print(f"costs: {source}; link: {link}")
    print(f"{'method':<6} {'devices':>7}  {'configuration':<16} {'tok/s':>7} {'vs AR':>6} {'tok/cycle':>9}  acceptance")
    for r in rows:
        print(f"{r['method']:<6} {r['devices']:>7}  {r['config']:<16} {r['tok_s']:>7.1f} {r['speedup']:>6.2f} "
              f"{r['tokens_per_cycle']:>9.2f}  {r['acceptance']}")
    best = max(rows, key=lambda r: r["tok_s"])
    print(f"recommended: {best['method']} on {best['devices']} device(s), {best['config']} "
          f"({best['speedup']:.2f}x the best AR)")


def plot_plan(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}):
        pts = [(r["devices"], r["speedup"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("devices")
    ax.set_ylabel("predicted speedup over the best AR")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
