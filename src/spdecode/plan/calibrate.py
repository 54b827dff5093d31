"""`plan --measure`'s pipeline calibration: what a rank of a real pipeline does per slot beyond
what the cost table charges for its layers and head.

A lone layer timing, even beside a twin process, does not show a stage rank's other work per
slot: unpacking the plan and compacting its cache, posting its report and the slot on, receiving
(the `plan` and `post` parts of its timer, distributed/stage.py), nor how its layers run with two
processes and gloo's threads on the same cores. So `--measure` runs a short real pipeline of two
processes (one node per slot, then spd's tree), reads every rank's time part by part, and records:

- `stage_slot_s`: a stage rank's plan + post per slot it ran;
- `stage_layers_ratio`, `stage_head_ratio`: the rank's measured layers (and the last rank's head
  and choices) over what the cost table charges for those slots at their rows;
- `root_stage0_ratio`: rank 0's stage 0 likewise;
- `root_send_s`: rank 0's settle, compaction, plan and send per cycle beyond the post that the
  table charges.

Each is recorded per run, at that run's mean rows per slot (`rows`; rank 0's: `root_rows`), and
read linear in rows between the two runs.

The simulator (plan/simulate.py, SimPipeline) adds the per-slot seconds on every pipeline, and
applies the ratios where the ranks share one machine's cores (the "1 concurrent" timings), as in
the runs they were measured from.
"""

from __future__ import annotations

import statistics

from ..runtime.errors import SpdError

# Prompts of the calibration run (not a benchmark: any text that makes the drafts work).
PROMPTS = ["Describe how a bicycle gear system works, step by step.",
           "Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain what a hash table is and when to use one."]
TOKENS = 64


def time_pipeline(model_name: str, dtype: str, device: str, data: dict, log=print) -> dict:
    """The calibration above, from runs of `model_name` in `dtype` with two processes; `data`: the
    cost file measured so far (its "1 concurrent" timings are what the ratios compare against)."""
    from ..bench.run import BenchConfig, run_distributed_spd
    from ..generators import MethodOptions
    from ..runtime.models import load_model
    from .cost_model import CONCURRENT, Costs

    if CONCURRENT not in data["target"]:
        raise SpdError("the pipeline calibration compares against the concurrent timings: measure them first")
    model, tok = load_model(model_name, dtype, device)
    sets = {"calibration": [{"question_id": i, "turns": [p]} for i, p in enumerate(PROMPTS)]}
    bench = BenchConfig(model=model_name, dtype=dtype, device=device, max_new_tokens=TOKENS, stages=2)
    runs = {}
    for kind, budget in (("one node per slot", 1), ("tree", None)):
        opts = MethodOptions(stages=2, tree_budget=budget, dtype=dtype, device=device)
        log(f"timing a real two-process pipeline ({kind})")
        records = run_distributed_spd(bench, "spd", opts, f"spd {kind}", model, tok, sets)
        context = statistics.fmean(r["prompt_tokens"] + r["new_tokens"] / 2 for r in records)
        runs[kind] = parts(records, Costs(data, CONCURRENT, context=context))
    out = {"runs": runs}
    for k in ("rows", "root_rows", *STAGE, *ROOT):
        out[k] = [r[k] for r in runs.values()]
    return out


STAGE = ("stage_slot_s", "stage_layers_ratio", "stage_head_ratio")  # by a stage rank's rows per slot
ROOT = ("root_send_s", "root_stage0_ratio")  # by rank 0's stage 0 rows per cycle


def parts(records: list[dict], costs) -> dict:
    """One run's rank times, part by part, against what `costs` charges (two ranks: rank 1 runs the
    last stage and the head)."""
    from ..distributed.stage import STAGE_STATS

    sizes = records[0]["stage_sizes"]
    if len(sizes) != 2:
        raise SpdError("the calibration reads a run of two processes")
    total = {k: sum(r["rank_stats"][0][i] for r in records) for i, k in enumerate(STAGE_STATS)}
    slots, rows = total["slots"], total["rows"] / max(total["slots"], 1)
    cycles = sum(r["cycles"] for r in records)
    phase = {k: sum(r["phase_s"].get(k, 0.0) for r in records) / cycles for k in ("stage0", "send")}
    entered = sum(r["nodes_entered"] for r in records) / cycles  # stage 0's rows per cycle
    return {
        "rows": rows, "root_rows": entered, "slots": slots, "cycles": cycles,
        "stage_slot_s": (total["plan"] + total["post"]) / slots,
        "stage_layers_ratio": total["layers"] / (slots * costs.layers_pass(sizes[1], round(rows), chunk=True)),
        "stage_head_ratio": total["head"] / (slots * costs.head(round(rows))),
        "root_stage0_ratio": phase["stage0"] / costs.layers_pass(sizes[0], max(1, round(entered)), chunk=True),
        # Beyond the send the table charges (the core's bookkeeping is its own lap on rank 0).
        "root_send_s": max(0.0, phase["send"] - costs.send()),
        "ms_per_slot": {k: 1e3 * total[k] / slots for k in ("plan", "layers", "head", "post", "wait", "send")},
    }
