"""`spdecode plan --devices K`: predicted tok/s per method and configuration from a cost file.

AR and eagle run on one device at their best thread count; SPD on n = 2..K devices, one node per
slot (as published) and over draft trees (spd's default tree), each n with its best split
(distributed.balance: rank 0 carries the drafter, the last rank the head), the link from the
cost file or a preset. Acceptance is a given alpha at every depth, or replayed from the walks of
an `eval-draft` or `bench` JSON (`--traces`); the output says which, and whose drafting cost
stands in where no draft was timed for a configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..generators import MethodOptions
from ..methods.spd_core import TreeShape
from ..runtime.errors import SpdError
from .cost_model import CONCURRENT, Costs
from .predict import Setup, predict
from .simulate import Drawn, Replayed, best_split, write_timeline

SHIPPED = Path(__file__).parent / "costs"
# (latency s, bandwidth bytes/s) of common links
LINKS = {"same-host": None, "pcie": (5e-6, 25e9), "nvlink": (2e-6, 300e9), "10gbe": (50e-6, 1.25e9),
         "100gbe": (10e-6, 12.5e9)}
PROMPT = 64  # prompt tokens of a planned generation


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


def load_walks(path: str) -> list[list[int]]:
    """Every verification pass ([tried, accepted]) of the records of an eval-draft or bench JSON."""
    try:
        records = json.loads(Path(path).read_text())["records"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SpdError(f"--traces {path}: not the JSON of `spdecode eval-draft` or `bench` ({exc})") from None
    walks = [w for r in records for w in r.get("walks", [])]
    if not walks:
        raise SpdError(f"--traces {path}: its records hold no walks (written by an older spdecode?)")
    return walks


def plan(data: dict, devices: int, alpha: float, link: str = "same-host", draft: str | None = None,
         tokens: int = 256, walks: list[list[int]] | None = None, traces: str = "",
         timeline: str | None = None, needs: bool = True) -> list[dict]:
    """One row per configuration (AR first); `timeline`: write the simulated run of the best one
    as a trace (the format of `generate --trace`); `needs`: for SPD over trees, also the acceptance
    per depth at which it would beat AR and eagle."""
    if devices < 1:
        raise SpdError(f"--devices must be at least 1 (got {devices})")
    if not 0.0 <= alpha <= 1.0:
        raise SpdError(f"--alpha must be in [0, 1] (got {alpha})")
    if link not in LINKS:
        raise SpdError(f"unknown link {link!r}; choose from {', '.join(LINKS)}")
    layers = int(data["n_layers"])
    context = PROMPT + tokens / 2
    keys = [k for k in data["target"] if k.isdigit()]
    best = min(keys, key=lambda k: Costs(data, k, context).ar_token())
    ar = predict(data, Setup("ar", (layers,), best), None, PROMPT, tokens)["tok_s"]
    rows = [{"method": "ar", "devices": 1, "config": f"{best} thread(s)", "tok_s": ar, "speedup": 1.0,
             "tokens_per_cycle": 1.0, "acceptance": "-"}]
    setups = [(data, Setup("ar", (layers,), best))]
    told = f"replayed from {traces}" if walks else f"alpha {alpha:.2f} given"

    def acceptance():
        return Replayed(walks) if walks else Drawn(alpha)

    def row(method, n, config, setup):
        setups.append((data, setup))
        r = predict(data, setup, acceptance(), PROMPT, tokens)
        rows.append({"method": method, "devices": n, "config": config, "tok_s": r["tok_s"],
                     "speedup": r["tok_s"] / ar, "tokens_per_cycle": r["tokens_per_cycle"], "acceptance": told,
                     "utilisation": r["utilisation"],
                     "drafter_cost_from": setup.drafter if setup.drafter_timed(costs.draft) else "none (0 s)"})
        if needs and method == "spd" and setup.shape.tree:  # what the drafts must reach for it to pay
            def at(a: float) -> float:
                return predict(data, setup, Drawn(a), PROMPT, tokens)["tok_s"]

            rows[-1]["alpha_to_beat_ar"] = needed_alpha(at, ar)
            rows[-1]["alpha_to_beat_eagle"] = needed_alpha(at, rows[1]["tok_s"])

    costs = Costs(data, best, context)
    head = nearest_draft(costs.draft, 1, "eagle")
    eagle = TreeShape(*MethodOptions().tree("eagle"))
    row("eagle", 1, f"tree {eagle.budget}:{eagle.depth}:{eagle.topk}",
        Setup("eagle", (layers,), best, shape=eagle, drafter=head))
    rank_threads = CONCURRENT if CONCURRENT in data["target"] and devices <= data["hardware"]["cores"] else "1"
    costs = Costs(data, rank_threads, context)
    if LINKS[link] is not None:  # the preset's wire, with the engine's own per-message work as measured
        measured = data.get("link", {})
        software = max(0.0, measured.get("message_s", 0.0) - measured.get("latency_s", 0.0))
        data = {**data, "link": {"latency_s": LINKS[link][0], "bandwidth_bytes_per_s": LINKS[link][1],
                                 "message_s": LINKS[link][0] + software}}
    tree = TreeShape(*MethodOptions().tree("spd"))
    for n in range(2, min(devices, layers) + 1):
        for shape, kind in ((TreeShape(), "one node per slot"), (tree, f"tree {tree.budget}:{tree.depth}:{tree.topk}")):
            name = draft or nearest_draft(costs.draft, n, "tree" if shape.tree else "")
            sizes = best_split(costs, n, costs.draft_pass(name, shape.budget))
            row("spd", n, f"stages {','.join(map(str, sizes))}, {kind}",
                Setup("spd", tuple(sizes), rank_threads, True, shape, name))
    if timeline:
        on, setup = setups[max(range(len(rows)), key=lambda i: rows[i]["tok_s"])]
        write_timeline(timeline, predict(on, setup, acceptance(), PROMPT, tokens, timeline=True)["events"],
                       len(setup.sizes) if setup.distributed else 1)
    return rows


def needed_alpha(tok_s_at, target: float, steps: int = 7) -> float | None:
    """The least acceptance per depth at which `tok_s_at(alpha)` reaches `target` (bisection to
    1/2^steps; None: not even at 1.0). The simulation is seeded, so it is monotone up to its noise."""
    if tok_s_at(1.0) < target:
        return None
    lo, hi = 0.0, 1.0
    if tok_s_at(lo) >= target:
        return 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if tok_s_at(mid) >= target else (mid, hi)
    return hi


def nearest_draft(drafts: dict, n: int, kind: str = "") -> str | None:
    """The timed draft whose cost stands in for n stages: an EAGLE-style head (`<model>-eagle`) for
    kind "eagle"; else the draft `<model>-n<N>` (kind "tree": `<model>-n<N>-tree` first) whose N is
    nearest to n."""
    import re

    if kind == "eagle":
        return next((d for d in drafts if d.endswith("-eagle")), None)
    found = {}
    for d in drafts:
        if m := re.search(r"-n(\d+)(-tree)?$", d):
            found.setdefault(int(m.group(1)), {})[bool(m.group(2))] = d
    if not found:
        return None
    near = found[min(found, key=lambda k: (abs(k - n), k))]
    return near.get(kind == "tree", next(iter(near.values())))


def load_measured(path: str) -> list[dict]:
    """The configurations a `plan --validate --json-out` file measured on this machine: devices
    (processes), what ran, measured tok/s and the speedup over the best AR measured beside it."""
    try:
        records = json.loads(Path(path).read_text())["records"]
        ar = max(r["measured_tok_s"] for r in records if r["method"] == "ar")
        return [{"devices": len(r["stages"]) if r["distributed"] else 1, "config": r["config"], "method": r["method"],
                 "tree": r["tree"], "tok_s": r["measured_tok_s"], "speedup": r["measured_tok_s"] / ar,
                 "predicted_tok_s": r["predicted_tok_s_alpha"], "alpha": r["alpha"]}
                for r in records if r["distributed"] or r["method"] in ("ar", "eagle")]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SpdError(f"--measured {path}: not the JSON of `spdecode plan --validate --json-out` ({exc})") from None


def print_plan(rows: list[dict], source: str, link: str, measured: list[dict] = ()) -> None:
    print(f"costs: {source}; link: {link}; every row below is simulated (predicted)")
    print(f"{'method':<6} {'devices':>7}  {'configuration':<40} {'tok/s':>7} {'vs AR':>6} {'tok/cycle':>9}  "
          "acceptance; drafting cost from")
    for r in rows:
        print(f"{r['method']:<6} {r['devices']:>7}  {r['config']:<40} {r['tok_s']:>7.1f} {r['speedup']:>6.2f} "
              f"{r['tokens_per_cycle']:>9.2f}  {r['acceptance']}" +
              (f"; {r['drafter_cost_from']}" if "drafter_cost_from" in r else ""))
    best = max(rows, key=lambda r: r["tok_s"])
    print(f"recommended: {best['method']} on {best['devices']} device(s), {best['config']} "
          f"({best['speedup']:.2f}x the best AR)")
    if measured:
        print("measured on this machine (plan --validate; alpha: the run's own):")
        for m in measured:
            print(f"  {m['devices']} process(es), {m['config']}: {m['tok_s']:.1f} tok/s measured "
                  f"({m['speedup']:.2f}x the best AR measured), {m['predicted_tok_s']:.1f} predicted at alpha "
                  f"{m['alpha'] or 0:.2f}")
    needs = [r for r in rows if "alpha_to_beat_ar" in r]
    if needs:
        print("acceptance per depth SPD over trees needs (simulated; '-': not even at 1.0):")
        for r in needs:
            print(f"  {r['devices']} devices, {r['config']}: to beat AR {fmt_alpha(r['alpha_to_beat_ar'])}, "
                  f"to beat eagle {fmt_alpha(r['alpha_to_beat_eagle'])}")


def fmt_alpha(a: float | None) -> str:
    return "-" if a is None else f"{a:.2f}"


def plot_plan(rows: list[dict], out: str, measured: list[dict] = ()) -> None:
    from ..runtime.errors import require_extra

    require_extra("plot", "plan --plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(series(r) for r in rows):
        pts = [(r["devices"], r["speedup"]) for r in rows if series(r) == label]
        ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    for m in measured:  # points measured here, apart from the simulated lines
        ax.plot(m["devices"], m["speedup"], marker="*", ms=11, ls="none", color="black")
        ax.annotate(f"measured: {m['config']}", (m["devices"], m["speedup"]), fontsize=6, xytext=(4, 2),
                    textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("devices")
    ax.set_ylabel("speedup over the best AR")
    ax.set_title("lines: simulated from the cost file" + ("; stars: measured here" if measured else ""), fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def series(row: dict) -> str:
    """A plotted line: the method, and for spd whether slots carry one node or a tree."""
    if row["method"] != "spd":
        return row["method"]
    return "spd (" + row["config"].split(", ", 1)[1] + ")"
