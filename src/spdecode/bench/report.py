"""`spdecode bench`'s numbers: pooled per dataset and method, the analytic prediction beside each
measured tokens-per-cycle, the table, the per-rank breakdown and the plot.

Pooled means token-weighted: alpha = accepted / verified drafts, tokens per cycle, tau = n *
tokens per cycle, decode tok/s = (new tokens - 1) / decode time; never means of per-prompt ratios.
"""

from __future__ import annotations

import statistics

from ..generators import base_method
from ..methods.pipespec import expected_tokens_per_step, rho
from ..methods.schedule import tau


def predicted_tokens_per_cycle(method: str, alpha: float | None, n: int, gamma: int) -> float | None:
    """What each method's analytic model predicts from the measured alpha, to set beside the
    measured tokens per cycle (SPD/SPEED: a pipeline cycle; SD and PipeSpec: a target pass)."""
    method = base_method(method)  # a spec's options do not change the model
    if method == "ar":
        return 1.0
    if alpha is None:
        return None
    if method.startswith(("spd", "speed")):
        return tau(alpha, n) / n
    if method == "sd":  # Leviathan et al.: expected tokens per target pass with gamma drafts
        return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    if method == "pipespec":
        return expected_tokens_per_step(alpha, gamma)
    return None


def pooled(records: list[dict]) -> dict:
    new = sum(r["new_tokens"] - 1 for r in records)
    cycles = sum(r["cycles"] for r in records)
    verified = sum(r["drafts_verified"] for r in records)
    n = records[0]["n_stages"]
    decode_s = sum(r["decode_s"] for r in records)
    tpc = new / cycles if cycles else None
    return {
        "prompts": len(records),
        "new_tokens": sum(r["new_tokens"] for r in records),
        "alpha": sum(r["drafts_accepted"] for r in records) / verified if verified else None,
        "tokens_per_cycle": tpc,
        "tau": n * tpc if tpc is not None else None,
        "decode_tok_s": new / decode_s if decode_s else None,
        "median_prompt_tok_s": statistics.median(r["decode_tok_s"] or 0 for r in records),
        "mismatches": sum(1 for r in records if r.get("matches_ar") is False),
        "checked_against_ar": sum(1 for r in records if "matches_ar" in r),
        # --method auto's online guard: the prompts it handed to AR part-way.
        "guard_fallbacks": sum(1 for r in records if r.get("guard_fallback_at") is not None),
        # Where the time of a cycle (a target pass for sd/eagle) goes, and, for draft trees, the
        # acceptance at each depth the walk tried (pooled).
        "ms_per_cycle": {k: 1e3 * sum(r.get("phase_s", {}).get(k, 0.0) for r in records) / cycles
                         for k in records[0].get("phase_s", {})} if cycles else {},
        "alpha_per_depth": per_depth(records),
        # SPD's engine core, per cycle: rows that entered the pipeline, verifications, and the
        # stage-rows spent on nodes that died (pruned work).
        "nodes_entered_per_cycle": sum(r.get("nodes_entered", 0) for r in records) / cycles if cycles else None,
        "verified_per_cycle": verified / cycles if cycles else None,
        "wasted_rows_per_cycle": sum(r.get("wasted_rows", 0) for r in records) / cycles if cycles else None,
    }


def per_depth(records: list[dict]) -> list[float | None] | None:
    trees = [r for r in records if r.get("verified_per_depth")]
    if not trees:
        return None
    depth = max(len(r["verified_per_depth"]) for r in trees)  # a walk's depth varies by generation
    verified, accepted = [0] * depth, [0] * depth
    for r in trees:
        for d, (v, a) in enumerate(zip(r["verified_per_depth"], r["accepted_per_depth"], strict=True)):
            verified[d] += v
            accepted[d] += a
    return [a / v if v else None for a, v in zip(accepted, verified, strict=True)]


def pipespec_rho(records: list[dict], alpha: float, gamma: int) -> dict:
    """PipeSpec's share of verification steps at the target, measured and as the paper's model has
    it, and E[N] with the measured share (the model's other half, the accepted run length)."""
    steps = sum(r["chain"][-1]["steps"] for r in records)
    measured = sum(r["chain"][-1]["verify_steps"] for r in records) / steps if steps else 0.0
    block = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return {"rho_measured": measured, "rho_model": rho(alpha, gamma),
            "model_tokens_per_step": expected_tokens_per_step(alpha, gamma),
            "tokens_per_step_with_measured_rho": (1 - measured) + measured * block}


def summarise(records: list[dict], methods, datasets, gamma: int | dict[str, int] = 4) -> dict:
    """Pooled rows per method and dataset; `gamma`: the drafts per pass of sd/pipespec (one for
    all, or per method spec) for their analytic predictions."""
    summary = {}
    for m in methods:
        g = gamma.get(m, 4) if isinstance(gamma, dict) else gamma
        mine = [r for r in records if r["method"] == m]
        summary[m] = {d: pooled([r for r in mine if r["dataset"] == d]) for d in datasets}
        summary[m]["overall"] = pooled(mine)
        tree = mine[0].get("verified_per_depth") is not None  # sd over a tree: no chain formula
        for d, row in summary[m].items():
            row["predicted_tokens_per_cycle"] = None if tree else predicted_tokens_per_cycle(
                m, row["alpha"], mine[0]["n_stages"], g)
            if base_method(m) == "pipespec" and row["alpha"] is not None:
                row.update(pipespec_rho(mine if d == "overall" else [r for r in mine if r["dataset"] == d],
                                        row["alpha"], g))
    base_ar = best_ar(summary)
    if base_ar:  # the baseline is the fastest AR configuration of the run
        for m in methods:
            for d, row in summary[m].items():
                base = summary[base_ar][d]["decode_tok_s"]
                row["speedup_vs_ar"] = row["decode_tok_s"] / base if base and row["decode_tok_s"] else None
                row["baseline"] = base_ar
    return summary


def best_ar(summary: dict) -> str | None:
    """The AR configuration (`ar`, `ar:threads=1`, ...) with the highest overall decode tok/s."""
    ars = [m for m in summary if base_method(m) == "ar" and summary[m]["overall"]["decode_tok_s"]]
    return max(ars, key=lambda m: summary[m]["overall"]["decode_tok_s"], default=None)


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(summary: dict) -> None:
    """tok/cyc: measured tokens per cycle (SPD, SPEED: pipeline cycle; SD, PipeSpec: target pass);
    model: the method's analytic prediction of it from the measured alpha."""
    w = max(8, *map(len, summary))
    head = f"{'method':<{w}} {'dataset':<10} {'prompts':>7} {'tokens':>7} {'alpha':>6} {'tok/cyc':>7} {'model':>6} " \
           f"{'tau':>5} {'tok/s':>7} {'vs AR':>6}"
    print(head)
    print("-" * len(head))
    for m, rows in summary.items():
        for d, r in rows.items():
            print(f"{m:<{w}} {d:<10} {r['prompts']:>7} {r['new_tokens']:>7} {fmt(r['alpha']):>6} "
                  f"{fmt(r['tokens_per_cycle']):>7} {fmt(r.get('predicted_tokens_per_cycle')):>6} "
                  f"{fmt(r['tau']):>5} {fmt(r['decode_tok_s'], '.1f'):>7} "
                  f"{fmt(r.get('speedup_vs_ar')):>6}" + (f"  MISMATCHES {r['mismatches']}" if r["mismatches"] else ""))
    base = next(iter(summary.values()))["overall"].get("baseline")
    if base:
        print(f"vs AR: against the fastest AR configuration of this run, {base}")
    for m, rows in summary.items():
        o = rows["overall"]
        if o.get("alpha_per_depth"):
            times = ", ".join(f"{k} {v:.1f}" for k, v in o["ms_per_cycle"].items())
            print(f"{m}: acceptance per depth " + " ".join(fmt(a) for a in o["alpha_per_depth"])
                  + f"; per cycle {fmt(o['nodes_entered_per_cycle'], '.1f')} nodes entered, "
                  f"{fmt(o['verified_per_cycle'])} verified, {fmt(o['tokens_per_cycle'])} tokens emitted, "
                  f"{fmt(o['wasted_rows_per_cycle'], '.1f')} stage-rows pruned; ms per cycle (rank 0): {times}")
        if ":guard=" in m:
            print(f"{m}: the online guard handed {o['guard_fallbacks']} of {o['prompts']} prompts to AR part-way")


def rank_breakdown(records: list[dict]) -> dict:
    """Milliseconds per cycle by rank and phase, pooled over the prompts."""
    cycles = sum(r["cycles"] for r in records) or 1
    out = {"rank0": {k: 1e3 * sum(r["phase_s"].get(k, 0.0) for r in records) / cycles
                     for k in records[0]["phase_s"]}}
    from ..distributed.stage import PHASES, WORK

    for s in range(len(records[0]["rank_stats"])):
        ms = {k: 1e3 * sum(r["rank_stats"][s][i] for r in records) / cycles for i, k in enumerate(PHASES)}
        # The slot's parts (plan, layers, head, post) and the prefill's work, as one "compute" too.
        out[f"rank{s + 1}"] = {"compute": sum(ms[k] for k in WORK), "wait": ms["wait"], "send": ms["send"],
                               **{k: ms[k] for k in WORK[1:]}}
    return out


def plot_speedups(summary: dict, path: str) -> None:
    """Grouped bars: wall-clock speedup over AR per dataset (and overall), one bar per method."""
    from ..runtime.errors import require_extra

    require_extra("plot", "bench --plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in summary if m != "ar"]
    datasets = list(next(iter(summary.values())))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(datasets), 3.6))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(datasets))]
        ys = [summary[m][d].get("speedup_vs_ar") or 0.0 for d in datasets]
        bars = ax.bar(xs, ys, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("decode speedup vs AR (same run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")
