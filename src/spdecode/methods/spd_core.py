"""The one SPD cycle over draft trees. Every executor (one process, rank 0 of torch.distributed,
the exact replay) drives this core and keeps no cycle loop of its own; eagle and tree SD are its
n = 1 case, SPD as published its one-node-per-slot case.

The core owns what does not depend on where the stages run: the schedule (schedule.py: the tree,
the slots, every cache's plan), the drafter's growth, the emitted tokens, the stop rule, the
counters and the settlement. An executor supplies two hooks (`SpdExecutor`): the prefill, and one
cycle of stage work, inside which it calls `run.grow()` once at the moment its drafter can run
(before the stages for the PDM, after stage 0 for SPEED) and `run.settle(choices)` once with the
target's token for each row of the exiting slot; it then applies the settlement's plans.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..drafting.protocols import SlotDrafter
from ..runtime import trace
from ..runtime.errors import SpdError
from ..runtime.generation import Generation, StopRule
from ..runtime.metrics import Clock, Metrics
from .schedule import Settlement, Slot, TreeSchedule


@dataclass(frozen=True)
class TreeShape:
    """How much the drafter adds per slot: `budget` nodes, grown `depth` levels deep, expanding
    `topk` nodes into `topk` children per level. Budget 1 is SPD as published (one token per
    slot, drawn from the drafter's distribution when sampling)."""

    budget: int = 1
    depth: int = 1
    topk: int = 1

    def __post_init__(self):
        if self.budget < 1 or self.depth < 1 or self.topk < 1:
            raise SpdError(f"a draft tree needs budget, depth and top-k >= 1 (got {self.budget}, {self.depth}, "
                           f"{self.topk})")

    @property
    def tree(self) -> bool:
        return self.budget > 1


ONE_NODE = TreeShape()  # SPD as published: one node per slot


class SpdExecutor(Protocol):
    def prefill(self, run: SpdRun) -> int:
        """Run the prompt through every stage (its anchors into run.store); return the first token."""

    def cycle(self, run: SpdRun, slot: Slot) -> None:
        """`slot` enters stage 0 and every busy stage runs its slot (schedule.stage_slots); call
        run.grow() once and run.settle(choices) once, then apply the settlement's plans."""


class SpdRun:
    """One generation: the schedule, the drafter's growth, the stop rule and the counters."""

    def __init__(self, n_stages: int, prompt_ids: list[int], drafter: SlotDrafter, stop: StopRule, metrics: Metrics,
                 store=None, shape: TreeShape = ONE_NODE, on_token: Callable[[int], None] | None = None,
                 sampler=None):
        """`store`: the AnchorStore the executor fills (None: the drafter reads no features);
        `sampler`: what the drafter draws with when sampling (SPD as published draws its draft)."""
        self.n, self.prompt = n_stages, list(prompt_ids)
        self.drafter, self.stop, self.metrics, self.store, self.shape = drafter, stop, metrics, store, shape
        self.on_token, self.sampler = on_token, sampler
        # The last position a token can be emitted at: nodes past it are never worth drafting.
        self.max_position = len(prompt_ids) + stop.max_new_tokens - 1
        self.emitted: list[int] = []
        self.sched: TreeSchedule | None = None
        self.clock = Clock(metrics.phase_s)
        # SPD as published drafts the next slot's one node a cycle ahead, concurrently with the
        # stages (the PDM on a device of its own). Here rank 0 runs the drafter and stage 0 one after
        # the other on the same core either way, so a tree is drafted just in time instead: into the
        # slot about to enter, after the last verdict and with one more stage of features, hedging
        # over one verdict instead of two (n = 1: that is speculative decoding over a tree).
        self.same_slot = shape.tree
        self.ahead = not shape.tree
        self._grown = self._settled = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    def tokens_to(self, node: int) -> list[int]:
        """The prompt and the tokens from the first generated one down to `node`."""
        out = []
        while node >= 0:
            out.append(self.sched.nodes[node].token)
            node = self.sched.nodes[node].parent
        return self.prompt + out[::-1]

    # -- called by executors ------------------------------------------------------------------
    def grow(self) -> None:
        """One node per slot (SPD as published): the drafter drafts the next slot's node, from what
        exists now. A tree shape drafts just in time instead (see __init__): nothing to do here."""
        if self._grown:
            raise SpdError("executor error: the drafter ran twice in one cycle")
        self._grown = True
        if self.ahead:
            before = len(self.sched.nodes)
            self.drafter.grow(self, now=False)
            self.metrics.drafts_proposed += len(self.sched.nodes) - before

    def settle(self, choices: list[int] | None) -> Settlement:
        """End the cycle with the target's token per row of the exiting slot (None: none exits)."""
        if self._settled:
            raise SpdError("executor error: a cycle settled twice")
        self._settled = True
        sched, m = self.sched, self.metrics
        old_root = sched.root
        try:
            done = sched.finish(choices)
        except ValueError as exc:
            raise SpdError(f"protocol error: {exc}") from exc
        v = done.verdict
        if v is not None:
            stepped = len(v.accepted) + (v.node is not None)
            m.drafts_verified += v.tried
            m.drafts_accepted += stepped
            # A correction with nothing rejected: the walk ran out of drafts (a leaf). Trees also
            # keep which sibling each step took (the replay steps into the same rank).
            leaf = int(v.node is None and v.tried == stepped)
            m.walks.append([v.tried, stepped, leaf, list(v.ranks)] if self.shape.tree else [v.tried, stepped, leaf])
            if self.shape.tree:  # one node per slot: one verification per verdict, alpha says it all
                m.record_walk(v.tried, stepped)
            if trace.active():
                trace.mark(f"accept {stepped}" if v.node is not None else f"accept {stepped}, correction",
                           {"checked": v.tried, "tokens": len(v.tokens)})
            for t in v.tokens:
                if self.stop.done(self.emitted):
                    break
                self._emit(t)
        if self.store is not None:
            if v is not None:  # the root and the accepted nodes left the pipeline: their anchors are complete
                for i in (old_root, *v.accepted):
                    self.store.commit(i, sched.nodes[i].position)
            self.store.forget(sched.settled_nodes())
        m.wasted_rows = sched.wasted
        return done

    # -- the loop -------------------------------------------------------------------------
    def drive(self, executor: SpdExecutor) -> Generation:
        m = self.metrics
        t0 = time.perf_counter()
        first = executor.prefill(self)
        self.sched = TreeSchedule(self.n, first, self.prompt_len)
        self._emit(first)
        m.prefill_s = time.perf_counter() - t0
        self.drafter.reset(self)
        t1 = self.clock.t = time.perf_counter()
        while not self.stop.done(self.emitted):
            m.cycles += 1
            self._grown = self._settled = False
            if self.same_slot:
                before = len(self.sched.nodes)
                self.drafter.grow(self, now=True)
                m.drafts_proposed += len(self.sched.nodes) - before
                self.clock.lap("draft")
            slot = self.sched.enter()
            m.nodes_entered += len(slot.rows)
            executor.cycle(self, slot)
            if not self._settled or (self.ahead and not self._grown):
                raise SpdError("executor error: a cycle must grow the draft once and settle once")
            self.clock.lap("bookkeeping")
        m.decode_s = time.perf_counter() - t1
        m.new_tokens, m.stop_reason = len(self.emitted), self.stop.reason
        return Generation(self.emitted, m)

    def _emit(self, token: int) -> None:
        self.emitted.append(token)
        if self.on_token:
            self.on_token(token)
