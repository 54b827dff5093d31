"""Confirm the simulator's best few configurations by running them, and the rule that leaves AR.

The candidates run short greedy generations of built-in prompts in rounds: every round runs each
one-process candidate once over every prompt, in an order rotated round by round (so no
candidate always follows the same one: paired and interleaved, as bench runs methods). A
pipeline (one process per stage) starts its processes once and runs the rounds back to back.
A candidate's speed is the median over rounds of its decode tok/s; its spread, the relative
range of those rounds. auto leaves the best AR only for a candidate faster by more than the
larger spread of the two (and at least MIN_MARGIN): a choice inside the noise would flip from
run to run.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from dataclasses import dataclass

from tqdm import tqdm

from .candidates import Candidate

# Built-in prompts for the confirmation runs (none from a training or evaluation set).
PROMPTS = ("List four things to check before a long car trip, with one sentence on each.",
           "Write a Python function that merges two sorted lists into one sorted list.")
ROUNDS = 3
TOKENS = 48
MIN_MARGIN = 0.03


@dataclass
class Measured:
    tok_s: list[float]  # per round
    cycle_s: float  # decode seconds per cycle, pooled
    tokens_per_cycle: float

    @property
    def median(self) -> float:
        return statistics.median(self.tok_s)

    @property
    def spread(self) -> float:
        return (max(self.tok_s) - min(self.tok_s)) / self.median if self.median else 0.0


def pooled_speed(gens) -> tuple[float, float, float]:
    """(tok/s, s per cycle, tokens per cycle) of several generations' metrics, token-weighted."""
    new = sum(g.new_tokens - 1 for g in gens)
    t = sum(g.decode_s for g in gens)
    cycles = sum(g.cycles for g in gens)
    return new / t, t / max(cycles, 1), new / max(cycles, 1)


def confirm(cands: list[Candidate], model_name: str, device: str = "cpu", rounds: int = ROUNDS,
            tokens: int = TOKENS) -> dict[Candidate, Measured]:
    from ..generators import make_generator
    from ..runtime.models import load_model
    from ..runtime.prompts import encode_prompt
    from ..runtime.sampling import GREEDY

    local = [c for c in cands if not c.distributed]
    models, out, raw = {}, {}, {c: [] for c in local}
    with contextlib.ExitStack() as stack, tqdm(total=rounds * len(local) + sum(c.distributed for c in cands),
                                               desc="auto: confirming", unit="run", leave=False, disable=None) as bar:
        runners = {}
        for c in local:
            if c.backend not in models:
                models[c.backend] = load_model(model_name, c.backend, device)
            model, tok = models[c.backend]
            opts = options(c, device)
            runners[c] = make_generator(c.method, model, model_name, opts, stack)[0]
        ids = [encode_prompt(models[local[0].backend][1] if local else None, p) for p in PROMPTS] if local else []
        for c in local:  # warm-up: first calls allocate caches and pick kernels
            runners[c](ids[0], 4, GREEDY, set())
        for r in range(rounds):
            order = local[r % len(local):] + local[:r % len(local)] if local else []
            for c in order:
                gens = [runners[c](p, tokens, GREEDY, set()).metrics for p in ids]  # no EOS: equal lengths
                raw[c].append(gens)
                bar.update()
        for c in local:
            per_round = [pooled_speed(g)[0] for g in raw[c]]
            _, cycle_s, tpc = pooled_speed([m for g in raw[c] for m in g])
            out[c] = Measured(per_round, cycle_s, tpc)
        for c in cands:
            if c.distributed:
                out[c] = confirm_pipeline(c, model_name, device, rounds, tokens)
                bar.update()
    return out


def options(c: Candidate, device: str):
    from ..generators import MethodOptions

    tree = dict(zip(("tree_budget", "tree_depth", "tree_topk"), c.tree, strict=True)) if c.tree else {}
    return MethodOptions(stages=c.stages, dtype=c.backend, device=device, threads=c.threads, **tree)


def confirm_pipeline(c: Candidate, model_name: str, device: str, rounds: int, tokens: int) -> Measured:
    """A pipeline candidate: its processes started once (bench's distributed path), every round's
    prompts back to back."""
    from ..bench.run import BenchConfig, run_distributed_spd
    from ..runtime.models import load_model

    model, tok = load_model(model_name, "float32", "cpu")
    cfg = BenchConfig(model=model_name, max_new_tokens=tokens, timeout=300.0)
    rows = [{"question_id": f"{r}-{i}", "turns": [p]} for r in range(rounds) for i, p in enumerate(PROMPTS)]
    with stdout_to_stderr():  # the launcher and its ranks print; a `generate --json` owns stdout
        records = run_distributed_spd(cfg, "spd", options(c, device), "auto", model, tok, {"auto": rows})

    class M:  # the records hold the metrics' fields
        def __init__(self, rec):
            self.new_tokens, self.decode_s, self.cycles = rec["new_tokens"], rec["decode_s"], rec["cycles"]

    ms = [M(rec) for rec in records]
    k = len(PROMPTS)
    per_round = [pooled_speed(ms[r * k:(r + 1) * k])[0] for r in range(rounds)]
    _, cycle_s, tpc = pooled_speed(ms)
    return Measured(per_round, cycle_s, tpc)


@contextlib.contextmanager
def stdout_to_stderr():
    """File descriptor 1 pointed at 2 for the block (child processes inherit it)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def decide(measured: dict[Candidate, Measured]) -> tuple[Candidate, Candidate, float]:
    """(the choice, the best AR, the margin it had to beat): the fastest candidate if it beats the
    best AR by more than the margin, else that AR."""
    ar = max((c for c in measured if c.method == "ar"), key=lambda c: measured[c].median)
    best = max(measured, key=lambda c: measured[c].median)
    margin = max(MIN_MARGIN, measured[best].spread, measured[ar].spread)  # the two compared: their noise
    if best.method != "ar" and measured[best].median <= measured[ar].median * (1 + margin):
        best = ar
    return best, ar, margin
