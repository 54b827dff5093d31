"""Predict a configuration's speed from a cost file by driving the real engine core with no model.

Every speculative method's cycles come from the engine's own core (methods.spd_core.SpdRun over
the pure schedule, trees included; eagle and tree/chain SD are its n = 1 case), fed by a drafter
stand-in that grows the shapes the real drafters grow (drafting.tree_build: one node per slot, or
EAGLE-2's best-first tree below the live nodes) and charges its passes, and an executor that runs
no layer. Whether a draft is right is decided when it is verified: the walk from the root steps
into the stand-in's best child while the acceptance says so (drawn per depth from an alpha, or
replayed from an exact accept/reject sequence), otherwise the target's token is a correction.

Two executors charge the cost file's times:
- `SimLocal`, one process: a cycle is the drafting plus every busy stage one after another (the
  one-process engine, methods/spd.py; eagle and sd);
- `SimPipeline`, one process per stage, along the distributed engine's message dependencies
  (distributed/root.py): rank s runs in cycle c the slot rank s-1 sent at the end of cycle c-1;
  rank 0 drafts, runs stage 0, then waits for every rank's report of the cycle before it sends
  its slot on.
AR is one full pass per token.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..distributed.balance import balanced_split
from ..drafting.tree_build import grow_below, newest_leaf, tree_starts
from ..methods.spd_core import ONE_NODE, SpdRun, TreeShape
from ..runtime.errors import SpdError
from ..runtime.generation import StopRule
from ..runtime.metrics import Metrics
from .cost_model import Costs

REJECT = -1  # the target's token when no draft holds it (the stand-in drafts tokens >= 0)


class Drawn:
    """Acceptance drawn per verification: right with probability alpha[d] at depth d of the walk
    (the last value for deeper ones), from a seeded generator."""

    def __init__(self, alpha: float | list[float], seed: int = 0):
        self.alpha = [alpha] if isinstance(alpha, int | float) else list(alpha)
        if not self.alpha or any(not 0.0 <= a <= 1.0 for a in self.alpha):
            raise SpdError(f"acceptance must be in [0, 1] (got {alpha})")
        self.rng = random.Random(seed)

    def next(self, depth: int) -> int | None:
        """The rank of the child the walk steps into at `depth` (always the best), or None: rejected."""
        return 0 if self.rng.random() < self.alpha[min(depth, len(self.alpha) - 1)] else None


class Replayed:
    """An exact accept/reject sequence per depth, from a run's walks ([tried, accepted, leaf,
    ranks] per verification pass, Metrics.walks): the d-th verification of a simulated walk takes
    the next outcome recorded at depth d (round again when it runs out; a depth never reached takes
    the deepest one recorded). A walk that ended at a leaf of the real tree counts as a stop one
    level down: the real tree had no draft there, so a simulated walk must not go on past it.
    `scores`: the run's Metrics.draft_scores, for the stand-in to grow the run's trees; with them an
    accepted step goes into the sibling of the rank the real walk took, without them into the best
    (the rank in the stand-in's own trees finds less in flight below it than the real tree held:
    spd's tokens per cycle replayed 5-10 % under the measured, against 3 % over into the best)."""

    def __init__(self, walks: list[list], scores: list[list[float]] | None = None):
        self.scores = scores or None
        self.by_depth: list[list[int | None]] = []
        for tried, accepted, *rest in walks:
            leaf, ranks = (rest[0] if rest else 0), (rest[1] if len(rest) > 1 and self.scores else [])
            for d in range(tried + bool(leaf)):
                while len(self.by_depth) <= d:
                    self.by_depth.append([])
                self.by_depth[d].append((ranks[d] if d < len(ranks) else 0) if d < accepted else None)
        if not self.by_depth:
            raise SpdError("the trace holds no verification to replay")
        self.at = [0] * len(self.by_depth)

    def rates(self) -> list[float]:
        """The share of outcomes at each depth that accepted (what drawing them on their own takes)."""
        return [sum(o is not None for o in outcomes) / len(outcomes) for outcomes in self.by_depth]

    def next(self, depth: int) -> int | None:
        """The rank of the child the walk steps into at `depth`, or None: rejected."""
        d = min(depth, len(self.by_depth) - 1)
        out = self.by_depth[d][self.at[d] % len(self.by_depth[d])]
        self.at[d] += 1
        return out


def depth_of(grown, i: int) -> int:
    """How far grown node i hangs below its starting node (its children: 1)."""
    depth, g = 1, grown[i]
    while g.parent is not None:
        depth, g = depth + 1, grown[g.parent]
    return depth


class StandIn:
    """The drafter stand-in (a protocols.SlotDrafter): the real drafters' shapes, with tokens that
    mean nothing (a rank index under each parent) and scores from a fixed distribution, or replayed
    in order from a real run's (`scores`, Metrics.draft_scores: its trees then grow as the real
    ones did); every pass it would make is charged with `pass_cost(rows)` into `spent`."""

    method, after_stage0, anchors = "sim", False, []
    RANKS = 16

    def __init__(self, pass_cost: Callable[[int], float], own_cache: bool = False,
                 scores: list[list[float]] | None = None):
        self.pass_cost = pass_cost
        self.scores, self.scored = scores or None, 0
        # A draft model over its own causal cache (sd's chain: drafting.candidates.ModelCandidates)
        # keeps the root and every draft it ran, and runs only what is new to it: after k drafts
        # accepted, the correction alone (or, all accepted, the last draft and the bonus token).
        # Charged as the engine's drafters' pass (the verified tokens and the root again), a 2-row
        # pass every cycle put fp32's sd 11 % slow on the EPYC, where 2 rows cost twice one.
        self.own_cache = own_cache
        self.spent = 0.0
        self.completed = 0
        self.ran = 0  # own_cache: levels of the last tree the drafter ran (its deepest is never run)

    def reset(self, run) -> None:
        self.completed, self.spent, self.ran = run.prompt_len, 0.0, 0

    def take(self) -> float:
        out, self.spent = self.spent, 0.0
        return out

    def _in_flight_pass(self, run, ids: list[int]) -> None:
        """The drafter's pass over the newly verified tokens and every live node (its view of the cycle)."""
        end = run.sched.nodes[run.sched.root].position
        if self.own_cache:
            cached = self.completed + min(end - self.completed, self.ran)
            self.spent += self.pass_cost(end + 1 - cached)
            self.completed, self.ran = end + 1, 0
            return
        self.spent += self.pass_cost(end - self.completed + len(ids))
        self.completed = end

    def grow(self, run, now: bool) -> None:
        sched = run.sched
        ids = [i for i in sched.live() if not now or i not in sched.drafted]
        if not run.shape.tree:
            leaf = newest_leaf(run, now)
            if leaf is not None:
                self._in_flight_pass(run, ids)
                sched.add(0, leaf, now=now)
            return
        starts = tree_starts(run, ids)
        if not starts:
            return
        self._in_flight_pass(run, ids)
        # The stand-in's next-token distribution by rank (token r has probability 2^-(r+1)): only
        # the shape of the trees depends on it. Room for every child a node can collect while its
        # slots are in flight, beyond the ones growth may add now.
        width = self.RANKS + run.shape.budget * (run.n + 1)
        base = -math.log(2) * torch.arange(1, width + 1, dtype=torch.float32)

        def expand(grown, frontier):
            # Grown nodes run once each; the starting nodes' outputs came with the pass above. sd's
            # draft model drafts no further than the last position a token can be emitted at.
            new = sum(kind == "new" and (not self.own_cache or depth_of(grown, r) + sched.nodes[
                grown[r].leaf].position < run.max_position) for kind, r in frontier)
            self.spent += self.pass_cost(new) if new else 0.0
            self.ran += bool(new)
            out = base.repeat(len(frontier), 1)
            for row, (kind, r) in enumerate(frontier):
                taken = {sched.nodes[c].token for c in sched.live_children(r)} if kind == "leaf" else set()
                if self.scores:
                    out[row] = self._replayed_row(width, taken)
                for t in taken:  # a starting node's existing children are not drafted again
                    out[row, t] = float("-inf")
            return out

        grow_below(run, starts, expand, None, now)

    def _replayed_row(self, width: int, taken: set[int]) -> torch.Tensor:
        """The next recorded row's log-probabilities on the ranks not `taken`, in order; the ranks
        after them fall away by halves below its last."""
        values = self.scores[self.scored % len(self.scores)]
        self.scored += 1
        free = [t for t in range(width) if t not in taken]
        last = values[-1] if values else 0.0
        values = values[:len(free)] + [last - math.log(2) * k for k in range(1, len(free) - len(values) + 1)]
        row = torch.full((width,), float("-inf"))
        row[free] = torch.tensor(values)
        return row


def walk_choices(sched, acceptance) -> list[int] | None:
    """The target's token for each row of the exiting slot: along the walk from the root, the
    stand-in's child of the rank the acceptance gives (its lowest where it has fewer) while the
    acceptance says a draft is right, then a correction."""
    if sched.exiting is None:
        return None
    rows = sched.exit_rows()
    here, depth, choice = sched.root, 0, {}
    while here in rows:
        kids = sched.ranked_children(here)
        # A leaf takes its depth's outcome too (the real walk's leaf recorded one), so that every
        # walk reads the outcomes of its own depths and a replay of the same trees stays in step.
        rank = acceptance.next(depth)
        if rank is None or not kids:
            choice[here] = REJECT
            break
        taken = kids[min(rank, len(kids) - 1)]
        choice[here], here, depth = sched.nodes[taken].token, taken, depth + 1
    return [choice.get(i, REJECT) for i in rows]


def stage_cost(costs: Costs, sizes: list[int], s: int, rows: int, in_flight: bool = False) -> float:
    """Stage s over `rows` rows of draft-tree nodes (`in_flight`: behind rows in flight in its
    cache); the last stage also runs the head."""
    return (costs.layers_pass(sizes[s], rows, chunk=True, in_flight=in_flight)
            + (costs.head(rows) if s == len(sizes) - 1 else 0.0))


def rank_stage_cost(costs: Costs, sizes: list[int], s: int, rows: int) -> float:
    """Stage s as a rank of a real pipeline runs it: its layers (and head) as the calibration found
    them beside the other ranks, and its work per slot around them (plan/calibrate.py)."""
    if not rows:
        return 0.0
    if s == 0:
        return costs.layers_pass(sizes[0], rows, chunk=True) * costs.ratio("root_stage0_ratio", rows)
    head = costs.head(rows) * costs.ratio("stage_head_ratio", rows) if s == len(sizes) - 1 else 0.0
    return (costs.layers_pass(sizes[s], rows, chunk=True) * costs.ratio("stage_layers_ratio", rows) + head
            + costs.stage_slot(rows))


def busy_stages(sched) -> list[tuple[int, int, bool]]:
    """(stage, rows, in flight) each stage runs this cycle: the entering slot's rows at stage 0, the
    rows still live of the older slots after it; and whether rows are in flight before them in
    that stage's cache (the engine's own layout of the chunk says: committed < start)."""
    out = []
    for s, sl in sched.stage_slots():
        rows, layout = (sl.rows, sl.layout0) if s == 0 else (sl.down_rows, sl.layout)
        out.append((s, len(rows), layout.committed < layout.start))
    return out


def verdict_mark(done) -> str | None:
    """What the engine's trace marks for a settlement (spd_core.SpdRun.settle), or None."""
    v = done.verdict
    if v is None:
        return None
    stepped = len(v.accepted) + (v.node is not None)
    return f"accept {stepped}" if v.node is not None else f"accept {stepped}, correction"


@dataclass
class SimLocal:
    """One process runs the drafter and every busy stage one after another."""

    costs: Costs
    sizes: list[int]
    acceptance: object
    cycle_s: float = 0.0  # the engine core's bookkeeping per cycle
    now: float = 0.0
    events: list | None = None  # (pid, phase or mark, start s, end s) when recording a timeline

    def prefill(self, run: SpdRun) -> int:
        return REJECT

    def cycle(self, run: SpdRun, slot) -> None:
        run.grow()
        work = sum(stage_cost(self.costs, self.sizes, s, rows, in_flight)
                   for s, rows, in_flight in busy_stages(run.sched))
        mark = verdict_mark(run.settle(walk_choices(run.sched, self.acceptance)))
        draft = run.drafter.take()
        if self.events is not None:
            t = self.now
            self.events += [(0, "draft", t, t + draft), (0, "stages", t + draft, t + draft + work),
                            (0, "bookkeeping", t + draft + work, t + draft + work + self.cycle_s)]
            if mark:
                self.events.append((0, mark, t + draft + work, None))
        self.now += draft + work + self.cycle_s


@dataclass
class SimPipeline:
    """One process per stage: rank 0 drafts and runs stage 0; rank s the slot rank s-1 sent last cycle."""

    costs: Costs
    sizes: list[int]
    acceptance: object
    cycle_s: float = 0.0  # the engine core's bookkeeping per cycle, on rank 0
    hidden_bytes: int = 576 * 2
    busy: list[float] = field(default_factory=list)
    now: float = 0.0  # rank 0's clock
    events: list | None = None  # (pid, phase or mark, start s, end s) when recording a timeline

    def __post_init__(self):
        n = len(self.sizes)
        self.busy = [0.0] * n
        self.free = [0.0] * n  # when rank s ends its previous cycle
        self.sent = [0.0] * n  # when rank s sent its last slot on

    def prefill(self, run: SpdRun) -> int:
        return REJECT

    def cycle(self, run: SpdRun, slot) -> None:
        n, costs = len(self.sizes), self.costs
        run.grow()
        # Its ranks' calibration (against the table's unmasked one row) holds the masked path already.
        rows = {s: r for s, r, _ in busy_stages(run.sched)}
        start0, draft = self.now, run.drafter.take()
        stage0 = rank_stage_cost(costs, self.sizes, 0, rows.get(0, 0))
        ready0 = start0 + draft + stage0
        # After every report rank 0 settles, compacts, plans and posts its slot on: the calibrated
        # send lap holds the core's bookkeeping (the engine's own lap is empty on a pipeline).
        after = costs.send() + costs.root_send(rows.get(0, 0)) + (self.cycle_s if costs.pipeline is None else 0.0)
        reports = []
        for s in range(1, n):  # rank s: the slot rank s-1 sent last cycle, once it is free
            r = rows.get(s, 0)
            begin = max(self.sent[s - 1] + costs.hop("forward", r * self.hidden_bytes, r), self.free[s])
            # Its posts: a report to rank 0 (in the calibrated per-slot work where there is one) and,
            # but on the last rank, the slot on.
            posts = (s < n - 1) + (costs.pipeline is None)
            work = rank_stage_cost(costs, self.sizes, s, r) + costs.send() * posts
            if self.events is not None:
                self.events += [(s, "wait", self.free[s], begin), (s, "compute", begin, begin + work)]
            self.busy[s] += work
            self.free[s] = begin + work
            reports.append(self.free[s] + costs.hop("report", r * self.hidden_bytes, r))
        # Rank 0 takes the reports in rank order: one there before it costs it the receive; one
        # that comes while it waits, the hop (which holds the receive).
        gathered = ready0
        for s, arrival in enumerate(reports, start=1):
            gathered = max(gathered + costs.report_recv(rows.get(s, 0)), arrival)
        self.busy[0] += draft + stage0 + after
        self.sent[1:] = self.free[1:]
        mark = verdict_mark(run.settle(walk_choices(run.sched, self.acceptance)))
        self.now = gathered + after
        self.sent[0] = self.now
        if self.events is not None:
            self.events += [(0, "draft", start0, start0 + draft), (0, "stage0", start0 + draft, ready0),
                            (0, "wait", ready0, gathered), (0, "send", gathered, self.now)]
            if mark:
                self.events.append((0, mark, self.now, None))


def simulate(costs: Costs, sizes: list[int], acceptance, shape: TreeShape = ONE_NODE, distributed: bool = True,
             draft_pass: Callable[[int], float] = lambda rows: 0.0, tokens: int = 256, prompt: int = 64,
             cycle_s: float = 0.0, timeline: bool = False, own_cache: bool = False) -> dict:
    """Predicted decode time, tok/s, tokens per cycle and per-rank utilisation of one generation of
    `tokens` new tokens after a `prompt`-token prompt: the engine core over `sizes` stages (one
    stage: eagle or sd), in one process per stage (`distributed`) or all in one process; `cycle_s`:
    the engine core's own work per cycle; `timeline`: also return the run's phases per rank as
    `events` (write_timeline turns them into the trace format of `generate --trace`); `own_cache`:
    the drafter is a draft model over its own cache (StandIn)."""
    if sum(sizes) != costs.layers or min(sizes) < 1:
        raise SpdError(f"stage sizes {sizes} do not split {costs.layers} layers")
    m = Metrics(method="sim", n_stages=len(sizes), prompt_tokens=prompt)
    executor = (SimPipeline if distributed and len(sizes) > 1 else SimLocal)(costs, list(sizes), acceptance, cycle_s)
    executor.events = [] if timeline else None
    drafter = StandIn(draft_pass, own_cache, getattr(acceptance, "scores", None))
    run = SpdRun(len(sizes), list(range(prompt)), drafter, StopRule(set(), tokens), m, shape=shape)
    run.drive(executor)
    t = executor.now
    busy = getattr(executor, "busy", None) or [t]
    return {"decode_s": t, "new_tokens": m.new_tokens, "tok_s": (m.new_tokens - 1) / t if t else None,
            "tokens_per_cycle": m.tokens_per_cycle, "alpha": m.alpha, "cycles": m.cycles,
            "cycle_ms": 1e3 * t / m.cycles if m.cycles else None, "utilisation": [b / t if t else 0.0 for b in busy],
            "sizes": list(sizes), **({"events": executor.events} if timeline else {})}


def write_timeline(path: str, events: list, ranks: int) -> None:
    """A simulated run's phases in the trace format of a measured one (runtime/trace.py), so that
    `spdecode plot-trace` and Perfetto show predicted and measured pipelines alike."""
    from ..runtime import trace

    trace.start(0, "rank 0 (simulated)")
    try:
        for s in range(1, ranks):
            trace.add(s, f"rank {s} (simulated)", [])
        for pid, name, t0, t1 in events:
            if t1 is None:
                trace.mark(name, at=t0)
            else:
                trace.span(name, t0, t1, pid)
        trace.write(path)
    finally:
        trace.stop()


def best_split(costs: Costs, n: int, draft_s: float = 0.0) -> list[int]:
    """The split that minimises the slowest rank for one row (rank 0 drafts, the last runs the head)."""
    if n > costs.layers:
        raise SpdError(f"{n} stages for {costs.layers} layers")
    return balanced_split(costs.layers, n, costs.layers_pass(1, 1), costs.head(1), draft_s)
