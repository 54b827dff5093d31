"""Predict a configuration's speed from a cost file by driving the real SPD core with no model.

SPD's cycles come from the engine's own core (methods.spd_core.SpdRun over the pure schedule),
fed by a drafter stand-in whose drafts are right with the given acceptance (drawn per draft from
a seeded generator, or replayed from an exact accept/reject sequence) and an executor that runs
no layer: it charges each rank what the cost file says its rows cost, along the same message
dependencies as the distributed engine (distributed/root.py): rank s runs in cycle c the slot
rank s-1 sent at the end of cycle c-1; rank 0 drafts, runs stage 0, then waits for every rank's
report of the cycle before it sends its slot on. AR is one full pass per token.

Known gaps (to be checked against measurements by `plan --validate`, still to come): one node
per slot only (trees need a drafter stand-in per depth); context length taken as one point.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..distributed.balance import balanced_split
from ..methods.spd_core import SpdRun
from ..runtime.errors import SpdError
from ..runtime.generation import StopRule
from ..runtime.metrics import Metrics


class Costs:
    """Seconds per part from a cost file (plan.costs.measure), at one context length."""

    def __init__(self, data: dict, threads: str, context: int | None = None):
        if threads not in data["target"]:
            raise SpdError(f"the cost file has no timings for {threads!r} threads (it has "
                           f"{', '.join(data['target'])})")
        t = data["target"][threads]
        ctx = [int(c) for c in t["layer"]]
        c = str(min(ctx, key=lambda x: abs(x - (context or ctx[0]))))
        self.layers = int(data["n_layers"])
        self._layer = {int(r): s for r, s in t["layer"][c].items()}
        self._head = {int(r): s for r, s in t["head"].items()}
        # What a whole step costs beyond its layers and head (embedding, sampling, Python), shared
        # out per layer: every rank pays it for the layers it runs, whatever their rows.
        step = t.get("step", {}).get(c)
        self.overhead = max(0.0, (step - self.layers * self._layer[1] - self._head[1]) / self.layers) if step else 0.0
        self.link = data.get("link", {"latency_s": 0.0, "bandwidth_bytes_per_s": float("inf")})
        self.draft = {name: {int(r): s for r, s in by.get(threads.split()[0], by[next(iter(by))]).items()}
                      for name, by in data.get("draft", {}).items()}

    @staticmethod
    def _at(table: dict[int, float], rows: int) -> float:
        """Linear in rows between the timed row counts (0 rows: nothing runs)."""
        if rows <= 0:
            return 0.0
        keys = sorted(table)
        lo = max([k for k in keys if k <= rows], default=keys[0])
        hi = min([k for k in keys if k >= rows], default=keys[-1])
        if lo == hi:
            return table[lo] * (rows / lo if rows > keys[-1] else 1.0)
        return table[lo] + (table[hi] - table[lo]) * (rows - lo) / (hi - lo)

    def layer(self, rows: int) -> float:
        return self._at(self._layer, rows)

    def head(self, rows: int) -> float:
        return self._at(self._head, rows)

    def ar_token(self) -> float:
        return self.layers * (self.layer(1) + self.overhead) + self.head(1)

    def message(self, nbytes: int) -> float:
        return self.link["latency_s"] + nbytes / self.link["bandwidth_bytes_per_s"]


class SimDrafter:
    """One draft per slot (SPD as published), right with probability `alpha` or as `accepts` says.
    The true continuation is token P + p + 1 at position p: a draft is right iff it is that token."""

    method, after_stage0, anchors = "spd-sim", False, []

    def __init__(self, alpha: float = 0.5, accepts: list[bool] | None = None, seed: int = 0):
        self.alpha, self.accepts, self.rng = alpha, list(accepts or []), random.Random(seed)

    def reset(self, run) -> None:
        pass

    def right(self) -> bool:
        return self.accepts.pop(0) if self.accepts else self.rng.random() < self.alpha

    def grow(self, run, now: bool) -> None:
        sched = run.sched
        leaf = sched.live()[-1]
        pos = sched.nodes[leaf].position + 1
        sched.add(truth(pos) if self.right() else -1, leaf)


def truth(position: int) -> int:
    return position + 1


@dataclass
class SimPipeline:
    """The SpdRun executor that charges costs instead of running stages."""

    costs: Costs
    sizes: list[int]
    draft_s: float = 0.0
    hidden_bytes: int = 576 * 2
    busy: list[float] = field(default_factory=list)
    now: float = 0.0  # rank 0's clock

    def __post_init__(self):
        n = len(self.sizes)
        self.busy = [0.0] * n
        self.free = [0.0] * n  # when rank s ends its previous cycle
        self.sent = [0.0] * n  # when rank s sent its last slot on

    def prefill(self, run: SpdRun) -> int:
        return truth(run.prompt_len - 1)

    def cost(self, s: int, rows: int) -> float:
        c = self.sizes[s] * (self.costs.layer(rows) + self.costs.overhead) if rows else 0.0
        return c + (self.costs.head(rows) if s == len(self.sizes) - 1 and rows else 0.0)

    def cycle(self, run: SpdRun, slot) -> None:
        sched, n = run.sched, len(self.sizes)
        run.grow()
        flight = sched.in_flight  # oldest first; the entering slot last
        rows = [len(slot.rows)] + [len(flight[-1 - s].down_rows) if len(flight) > s else 0 for s in range(1, n)]
        start0 = self.now
        work0 = self.draft_s + self.cost(0, rows[0])
        reports = []
        for s in range(1, n):  # rank s: the slot rank s-1 sent last cycle, once it is free
            begin = max(self.sent[s - 1] + self.costs.message(rows[s] * self.hidden_bytes), self.free[s])
            work = self.cost(s, rows[s])
            self.busy[s] += work
            self.free[s] = begin + work
            reports.append(self.free[s] + self.costs.message(rows[s] * self.hidden_bytes))
        self.busy[0] += work0
        self.sent[1:] = self.free[1:]
        choices = None
        if sched.exiting is not None:
            choices = [truth(sched.nodes[i].position + 1) for i in sched.exit_rows()]
        run.settle(choices)
        self.now = max([start0 + work0, *reports])
        self.sent[0] = self.now


def simulate_spd(costs: Costs, sizes: list[int], alpha: float = 0.5, accepts: list[bool] | None = None,
                 tokens: int = 256, prompt: int = 64, draft_s: float = 0.0, seed: int = 0) -> dict:
    """Predicted decode tok/s, tokens per cycle and per-rank utilisation of one-node SPD."""
    if sum(sizes) != costs.layers or min(sizes) < 1:
        raise SpdError(f"stage sizes {sizes} do not split {costs.layers} layers")
    m = Metrics(method="spd-sim", n_stages=len(sizes), prompt_tokens=prompt)
    pipe = SimPipeline(costs, sizes, draft_s)
    run = SpdRun(len(sizes), list(range(prompt)), SimDrafter(alpha, accepts, seed), StopRule(set(), tokens), m)
    run.drive(pipe)
    t = pipe.now
    return {"tok_s": (m.new_tokens - 1) / t if t else None, "tokens_per_cycle": m.tokens_per_cycle,
            "alpha": m.alpha, "cycle_ms": 1e3 * t / m.cycles, "utilisation": [b / t for b in pipe.busy],
            "sizes": list(sizes)}


def best_split(costs: Costs, n: int, draft_s: float = 0.0) -> list[int]:
    """The split that minimises the slowest rank for one row (rank 0 drafts, the last runs the head)."""
    if n > costs.layers:
        raise SpdError(f"{n} stages for {costs.layers} layers")
    return balanced_split(costs.layers, n, costs.layer(1), costs.head(1), draft_s)
