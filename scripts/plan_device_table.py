"""The README's multi-device table: for K = 2..8 devices and each link preset, SPD over trees as
`spdecode plan` predicts it, the acceptance per depth it needs to beat AR and eagle, and which
rows were measured here (`--measured`, a `plan --validate --json-out` file) rather than simulated.

    python scripts/plan_device_table.py --costs costs.json --measured validate.json --plot docs/plan.png
"""

from __future__ import annotations

import argparse
import json

from spdecode.plan.planner import LINKS, load_costs, load_measured, plan, plot_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--costs", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.45)
    ap.add_argument("--measured", default=None)
    ap.add_argument("--plot", default=None, help="the 10gbe plan's PNG, measured points marked")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    data, source = load_costs(args.costs, args.model, args.dtype)
    measured = load_measured(args.measured) if args.measured else []
    by_link = {link: plan(data, args.devices, args.alpha, link) for link in LINKS}
    base = by_link["10gbe"]
    ar, eagle = base[0]["tok_s"], base[1]["tok_s"]

    def alpha(a):
        return "-" if a is None else f"{a:.2f}"

    print(f"costs: {source}; AR {ar:.1f} tok/s ({base[0]['config']}), eagle {eagle:.1f} tok/s at alpha "
          f"{args.alpha} (simulated)")
    links = list(LINKS)
    names = ", ".join(links)
    print(f"| devices | SPD over trees, split | tok/s at alpha {args.alpha:.2f}, 10gbe (x AR) | measured here "
          f"| alpha to beat AR: {names} | alpha to beat eagle: {names} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(base):
        if "alpha_to_beat_ar" not in r:
            continue
        same = [by_link[link][i] for link in links]
        seen = [m for m in measured if m["devices"] == r["devices"] and m["tree"] and m["tree"][0] > 1]
        note = "; ".join(f"{m['tok_s']:.1f} tok/s ({m['speedup']:.2f}x), 2 processes on 2 cores" for m in seen)
        print(f"| {r['devices']} | {r['config'].split(', ')[0]} | {r['tok_s']:.1f} ({r['speedup']:.2f}x) | "
              f"{note or 'simulated'} | {', '.join(alpha(x['alpha_to_beat_ar']) for x in same)} | "
              f"{', '.join(alpha(x['alpha_to_beat_eagle']) for x in same)} |")
    if args.plot:
        plot_plan(base, args.plot, measured)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"costs": source, "by_link": by_link, "measured": measured}, f, indent=1)


if __name__ == "__main__":
    main()
