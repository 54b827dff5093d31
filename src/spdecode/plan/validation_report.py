"""`plan --validate`'s report on the terminal: each configuration's measured runs beside its two
predictions, the worst error over all units and over the steady ones, and how restless the hour was."""

from __future__ import annotations


def print_validation(out: dict) -> None:
    when = " (timed between the runs)" if out.get("costs_timed_between_runs") else ""
    print(f"costs: {out['costs'] or 'not saved'}{when}")
    print(f"{'configuration':<34} {'measured':>8} {'runs':>17}  {'traces':>6} {'error':>6}  {'alpha':>6} {'error':>6}"
          f"  {'tok/cycle measured, traces, alpha'}")
    for r in out["records"]:
        runs = "/".join(f"{t:.1f}" for t in r["measured_runs_tok_s"])
        tpc = (f"{r['measured_tokens_per_cycle']:.2f}, {r['predicted_tokens_per_cycle_traces']:.2f}, "
               f"{r['predicted_tokens_per_cycle_alpha']:.2f}")
        print(f"{r['config']:<34} {r['measured_tok_s']:>8.1f} {runs:>17}  {r['predicted_tok_s_traces']:>6.1f} "
              f"{r['error_traces']:>+6.0%}  {r['predicted_tok_s_alpha']:>6.1f} {r['error_alpha']:>+6.0%}  {tpc}")
    paired = " (each run against the round of costs timed just before it: the errors' median)" if out.get(
        "runs_paired_with_rounds") else ""
    print(f"max relative error: {out['max_relative_error']:.1%}{paired} (tok/s: median of the runs, decode only)")
    if out.get("max_relative_error_steady") is not None:
        units = sum(r.get("steady_units", 0) for r in out["records"])
        total = sum(len(r["generations"]) * len(r["measured_runs_tok_s"]) for r in out["records"])
        print(f"over the prompts the gate read steady before and after ({units} of {total} runs of a configuration "
              f"on a prompt; {out['steady_configurations']} of {len(out['records'])} configurations had any): "
              f"max relative error {out['max_relative_error_steady']:.1%}")
    if out.get("steady"):
        st = out["steady"]
        print(f"steady: {st['gauges']} waits for the machine's usual speed took {st['waited_s']:.0f} s in all, "
              f"{st['gave_up']} ran out ({st['max_wait_s']:.0f} s each"
              f"{', then the budget of ' + format(st['budget_s'], '.0f') + ' s' if st.get('budget_spent') else ''}), "
              f"{st['retaken']} parts or prompts taken again (plan/steady.py)")
        if st.get("readings_over_reference"):
            print("steady: the gauge's readings over its usual (quantiles 5/25/50/75/95 %): "
                  + "/".join(f"{q:.2f}" for q in st["readings_over_reference"]))
    if out.get("host_slowdown") is not None:
        p = out["host_probe"]
        probes = "/".join(f"{1e3 * t:.1f}" for t in p["step_s"])
        print(f"host: an AR step ({p['threads']} threads, context {p['context']}) took {out['host_slowdown']:.2f}x "
              f"what the cost file has (median of the probes before each run and after the last: {probes} ms)")
