"""Run one `spdecode bench` command several times and report each method's median over the runs.

    python scripts/bench_repeat.py --runs 3 --out runs/i23/auto -- --method ar,eagle,spd --distributed \
        --stages 2 --ar-sweep --backend auto --data prompts.jsonl --max-new-tokens 128

Each run interleaves the methods per prompt (bench does); the runs follow one another, so a
machine's drift shows as spread between runs, which the table reports beside the medians. The
speedup is taken per run against that run's best AR, then the median of those ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", required=True, help="prefix of the per-run JSON files and of the medians' JSON")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then spdecode bench's arguments")
    args = ap.parse_args()
    bench = [a for a in args.bench if a != "--"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for k in range(args.runs):
        path = out.with_name(f"{out.name}-run{k + 1}.json")
        cmd = [sys.executable, "-m", "spdecode", "bench", *bench, "--json-out", str(path)]
        print(" ".join(cmd), flush=True)
        res = subprocess.run(cmd)
        if res.returncode not in (0, 1):  # 1: an identity check failed, still measured; report it below
            return res.returncode
        runs.append(json.loads(path.read_text()))
    first = runs[0]
    rows = {}
    for m in first["summary"]:
        overall = [r["summary"][m]["overall"] for r in runs]
        tok_s = [o["decode_tok_s"] for o in overall]
        rows[m] = {"tok_s": statistics.median(tok_s), "tok_s_runs": tok_s,
                   "speedup_vs_best_ar": statistics.median(o.get("speedup_vs_ar") or 0 for o in overall),
                   "baselines": [o.get("baseline") for o in overall],
                   "tokens_per_cycle": statistics.median(o["tokens_per_cycle"] or 0 for o in overall),
                   "alpha_per_depth": overall[0].get("alpha_per_depth"),
                   "identical_to_ar": [f"{o['checked_against_ar'] - o['mismatches']}/{o['checked_against_ar']}"
                                       for o in overall],
                   "ms_per_cycle": overall[0].get("ms_per_cycle")}
    print(f"\nmachine: {first.get('machine')}")
    print(f"{'method':<28} {'tok/s (median)':>14} {'runs':>22} {'vs best AR':>10} {'tok/cyc':>7}  identical")
    for m, r in rows.items():
        runs_s = "/".join(f"{x:.1f}" for x in r["tok_s_runs"])
        print(f"{m:<28} {r['tok_s']:>14.1f} {runs_s:>22} {r['speedup_vs_best_ar']:>10.2f} "
              f"{r['tokens_per_cycle']:>7.2f}  {' '.join(r['identical_to_ar'])}")
    print(f"best AR per run: {', '.join(str(b) for b in rows[next(iter(rows))]['baselines'])}")
    for k, r in enumerate(runs):
        for m, entries in (r.get("divergences") or {}).items():
            margins = sorted(e.get("fp32_margin", float("nan")) for e in entries)
            print(f"run {k + 1} {m}: {len(entries)} departure(s), reference top-2 margins "
                  + ", ".join(f"{x:.1e}" for x in margins))
    out.with_name(f"{out.name}-medians.json").write_text(json.dumps({"machine": first.get("machine"), "rows": rows},
                                                                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
