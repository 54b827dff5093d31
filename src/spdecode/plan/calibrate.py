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
  table charges;
- `forward_hop_s`, `report_hop_s`: a message's hop as its receiver, already waiting, saw it in the
  run's trace: from rank 0's send to rank 1 holding the slot, and from rank 1's report to rank 0
  holding it (with the anchors it stores). Two busy processes on a guest's cores hop far slower
  than a ping-pong on idle ones (`link.message_s`): on a 2-vCPU KVM guest a mean of 1.0-1.6 ms, a
  tenth of them past 3 ms, against 0.3 ms idle, and a pipeline pays it twice per cycle;
- `report_recv_s`: rank 0's wait for a report that was there before it (receive, store anchors).

Each is recorded per run, at that run's mean rows per slot (`rows`; rank 0's: `root_rows`), and
read linear in rows between the two runs.

The simulator (plan/simulate.py, SimPipeline) adds the per-slot seconds on every pipeline, and
applies the ratios where the ranks share one machine's cores (the "1 concurrent" timings), as in
the runs they were measured from.
"""

from __future__ import annotations

import bisect
import statistics
import tempfile
from pathlib import Path

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
    from ..bench.timeline import load_trace
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
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            records = run_distributed_spd(bench, "spd", opts, f"spd {kind}", model, tok, sets, trace=str(trace))
            events = load_trace(str(trace))["traceEvents"]
        context = statistics.fmean(r["prompt_tokens"] + r["new_tokens"] / 2 for r in records)
        runs[kind] = parts(records, Costs(data, CONCURRENT, context=context)) | hops(events)
    out = {"runs": runs}
    for k in ("rows", "root_rows", *STAGE, *ROOT, *HOPS):
        out[k] = [r[k] for r in runs.values()]
    return out


STAGE = ("stage_slot_s", "stage_layers_ratio", "stage_head_ratio")  # by a stage rank's rows per slot
ROOT = ("root_send_s", "root_stage0_ratio")  # by rank 0's stage 0 rows per cycle
HOPS = ("forward_hop_s", "report_hop_s", "report_recv_s")  # by a stage rank's rows per slot


def hops(events: list[dict]) -> dict:
    """Each direction's hop between ranks 0 and 1 in a run's trace (runtime/trace.py events).

    Every cycle rank 0 sends one slot (its `send` lap), which rank 1 waits for, plans, runs and
    reports (`post`); rank 0 takes that report in its next cycle's `wait` (the last cycle's in the
    request's drain, untimed; the first cycle's wait is for the priming message). So within a
    request (rank 1's `compute` lap, the prefill, starts each one) the i-th send pairs with rank
    1's i-th slot wait, and the i-th post with rank 0's (i+1)-th wait. A hop is what a receiver
    already waiting when the message left waited after its sender's lap ended (a lap ends after its
    send, so it can come out negative: 0); a report that was there first costs rank 0 its whole
    wait (the receive and the anchors it stores)."""
    def spans(pid: int, name: str) -> list[tuple[float, float]]:
        return sorted((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in events
                      if e.get("ph") == "X" and e["pid"] == pid and e["name"] == name)

    def within(seq, lo, hi):
        return [x for x in seq if lo <= x[0] < hi]

    plans = [b for b, _ in spans(1, "plan")]

    def before_plan(end: float) -> bool:
        i = bisect.bisect_left(plans, end - 1e-6)
        return i < len(plans) and plans[i] <= end + 1e-6

    starts = [b for b, _ in spans(1, "compute")] + [float("inf")]
    sends, waits0, posts = spans(0, "send"), spans(0, "wait"), spans(1, "post")
    slot_waits = [w for w in spans(1, "wait") if before_plan(w[1])]
    forward, report, there = [], [], []
    for lo, hi in zip(starts, starts[1:], strict=False):
        s, w0, p, w1 = (within(x, lo, hi) for x in (sends, waits0, posts, slot_waits))
        if not len(s) == len(w0) == len(p) == len(w1):
            raise SpdError(f"the calibration trace's request at {lo:.3f} s has {len(s)} slots sent, {len(w1)} "
                           f"received and {len(p)} reported, {len(w0)} waits on rank 0: not one pipeline's")
        for (_, sent), (begin, end) in zip(s, w1, strict=True):
            if begin <= sent:
                forward.append(max(0.0, end - sent))
        for (_, posted), (begin, end) in zip(p, w0[1:], strict=False):
            if begin <= posted:
                report.append(max(0.0, end - posted))
            else:
                there.append(end - begin)
    if not forward or not report + there:
        raise SpdError("the calibration run's trace shows no slot that found its receiver waiting")
    # A run whose rank 0 never waited on a report (or always did) bounds one by the other.
    return {"forward_hop_s": statistics.fmean(forward), "report_hop_s": statistics.fmean(report or there),
            "report_recv_s": statistics.fmean(there or report),
            "hops_timed": [len(forward), len(report), len(there)]}


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
