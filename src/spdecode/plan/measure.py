"""`spdecode plan --measure`: the cost file, its parts (plan/costs.py) timed in rounds.

The target's table is timed `rounds` times, the thread counts interleaved, and each entry's median
kept: on a 2-vCPU KVM guest a 2-thread AR step timed 5 times in a row came out anywhere in
26.6-29.9 ms from one half-second to the next, which a single round took for the machine's speed.
The drafters, the concurrent table and the pipeline calibration are timed once, after the rounds.

`plan --validate` times its own cost file between its runs (`between`): then every part is timed
in every round, right before that round's run (which gets that round's file to set it against),
and each entry's median kept. The same guest's speed drifts 10-30 % between hours and up to 30 %
within minutes (an AR step probed at 22, 18, 15 and 15 ms within one validation), so a cost file
measured before a validation met another machine than the runs it predicts: the error it shows is
then the drift's as much as the simulator's.
"""

from __future__ import annotations

import json
import statistics

import torch

from ..runtime.errors import SpdError
from .cost_model import CONCURRENT
from .costs import (
    CONTEXTS,
    ROWS,
    hardware,
    load_target,
    target_pass,
    time_concurrent,
    time_drafting,
    time_link,
    time_pdm,
    time_target,
    ungated,
)
from .steady import steadily as gated

ROUNDS = 3


def median_tables(tables: list):
    """The entry-wise median of several timings of the same table: nested dicts and lists, numbers
    at the leaves (anything else, a name or a shape, is the first table's)."""
    first = tables[0]
    if isinstance(first, dict):
        return {k: median_tables([t[k] for t in tables]) for k in first}
    if isinstance(first, list | tuple) and all(isinstance(t, list | tuple) and len(t) == len(first) for t in tables):
        return [median_tables([t[i] for t in tables]) for i in range(len(first))]
    if isinstance(first, int | float) and not isinstance(first, bool):
        return statistics.median(tables)
    return first


def measure(model_name: str, dtype: str = "float32", device: str = "cpu", threads=(1, 2), rows=ROWS,
            contexts=CONTEXTS, reps: int = 5, drafts: bool | set[str] = True, link: bool = True,
            concurrent: bool = True, pipeline: bool = True, rounds: int = ROUNDS, between=None,
            gate=None, log=print) -> dict:
    """The cost file of `model_name` in `dtype` on `device` (plan/costs.py says what each part is);
    `drafts`: every bundled draft, none, or those named; `pipeline`: also a real two-process run's
    calibration (plan/calibrate.py), where the concurrent timings and a bundled draft exist;
    `between(r, costs)`: run after round r with that round's whole cost file, every part then timed
    in every round (above); `gate` (a steady.SteadyGate): each part timed between a wait for the
    machine's usual speed and a check, and again where the check finds it slowed (plan/steady.py)."""
    if any(k < 1 for k in threads):
        raise SpdError(f"thread counts must be at least 1 (got {threads})")
    if rounds < 1:
        raise SpdError(f"rounds must be at least 1 (got {rounds})")
    model, target = load_target(model_name, dtype, device)
    out = {"model": model_name, "dtype": dtype, "n_layers": target.n_layers, "rows": list(rows),
           "contexts": [c for c in contexts if c + max(rows) + 1 <= target.context_length],
           "hardware": hardware(device)}
    if link:  # first: the pipeline calibration charges its sends
        log("timing the link between two processes")
        out["link"] = time_link("nccl" if device.startswith("cuda") else "gloo")
    parts = dict(model=model, target=target, model_name=model_name, dtype=dtype, device=device, threads=threads,
                 rows=rows, reps=reps, drafts=drafts, concurrent=concurrent, pipeline=pipeline, log=log)
    before = torch.get_num_threads()
    steadily = gated(gate)

    def target_table(k: int, r: int) -> dict:
        torch.set_num_threads(k)
        log(f"timing the target with {k} thread(s), round {r + 1} of {rounds}")
        return time_target(target, rows, contexts, reps, lambda what, fn: steadily(
            f"the table at {k} thread(s), round {r + 1}: {what}", fn))

    timed = []
    try:
        for r in range(rounds):
            timed.append({"target": {str(k): target_table(k, r) for k in threads}})
            if between is not None:
                timed[-1] = beyond_table(out | timed[-1], **parts, steadily=lambda what, fn, r=r: steadily(
                    f"{what}, round {r + 1}", fn))
                torch.set_num_threads(before)
                between(r, timed[-1])
        out |= median_tables(timed)
        if between is None:
            out |= beyond_table(out, **parts)
    finally:
        torch.set_num_threads(before)
    return out


def beyond_table(data: dict, model, target, model_name: str, dtype: str, device: str, threads, rows, reps: int,
                 drafts: bool | set[str], concurrent: bool, pipeline: bool, log, steadily=ungated) -> dict:
    """`data` with the parts beyond the target's one-process table: each drafter's pass and call
    per thread count, the concurrent table and the pipeline calibration (against `data`'s table);
    `steadily(what, fn)` runs each part's timing (plan --validate's gate, plan/steady.py)."""
    from ..drafting.pdm import CONFIG_FILE, bundled_drafts, load_pdm
    from ..runtime.models import weights_fingerprint
    from ..runtime.staged import StagedTarget

    out = data | {"target": dict(data["target"]), "draft": {}, "draft_call": {}}
    named = [d for d in bundled_drafts(model_name) if drafts is True or (drafts and d.name in drafts)]
    if named:
        cycle_before = target_pass(target, out["contexts"][-1], max(rows))
        for k in threads:
            torch.set_num_threads(k)
            for d in named:
                cfg = json.loads((d / CONFIG_FILE).read_text())
                pdm = load_pdm(d, StagedTarget(model, cfg["stage_sizes"]), weights_fingerprint(model))
                out["draft"].setdefault(d.name, {})[str(k)] = steadily(
                    f"{d.name}'s passes at {k} thread(s)", lambda p=pdm: time_pdm(p, rows, reps, cycle_before))
                out["draft_call"].setdefault(d.name, {})[str(k)] = steadily(
                    f"{d.name} drafting at {k} thread(s)", lambda d=d: time_drafting(model, model_name, d))
    if concurrent and device == "cpu" and out["hardware"]["cores"] >= 2:
        log("timing the target with one thread in each of two processes at once")
        out["target"][CONCURRENT] = steadily("the concurrent table", lambda: time_concurrent(
            model_name, dtype, rows, out["contexts"], reps))
    if pipeline and CONCURRENT in out["target"] and bundled_drafts(model_name):
        from .calibrate import time_pipeline

        out["pipeline"] = steadily("the pipeline calibration", lambda: time_pipeline(model_name, dtype, device, out,
                                                                                   log))
    return out
