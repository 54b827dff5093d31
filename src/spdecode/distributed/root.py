"""SPD on torch.distributed: one process per stage, the same engine core and plans as the
single-process decoder (methods/spd.py), draft trees included.

Rank s runs stage s. Rank 0 also runs the drafter (so n processes suffice; give stage 0 fewer
layers to balance it) and drives the SPD core as its executor; the last rank also runs the LM
head and gives the target's choices for the rows of the slot leaving the pipeline. A cycle:

  rank 0:  the drafter grows the tree for the next slot (features from the previous cycle),
           stage 0 runs this cycle's slot, rank 0 gathers one report from every other rank
           (their output rows as anchors; from the last rank the choices), settles the cycle
           (the core's walk, prune and plans), forgets stage 0's dead rows and sends the slot's
           live rows on with its plan (schedule.Slot: the compaction to apply before it, where
           its rows go and what they see);
  rank s:  takes what rank s-1 sent in the previous cycle, applies the plan, runs its layers,
           passes the rows and the plan on, and reports its output to rank 0; the last rank
           computes the target's choice per row (verify.target_choices) instead of passing on.

Rank 0 receives from rank 1 before sending to it, and rank 1 sends before receiving: both sides
of the one pair that talks both ways post in the same order, which NCCL needs (it runs both
directions of a pair on one stream, and a send waits for its receive).

The draft reaches stage 0 with no wait for verification, verification happens where h_L is, and
there is no collective: only point-to-point messages. Work on nodes that died after they were
sent still runs downstream (rank 0 learns of a miss only when the slot exits); every stage
forgets it when the plan of the next slot arrives. Greedy output and every counter equal the
single-process decoder's.
"""

from __future__ import annotations

import torch

from ..drafting.drafters import AnchorStore
from ..methods.schedule import Slot
from ..methods.spd import (
    anchor_store,
    embed_rows,
    keep_nodes,
    lookahead_rows,
    prefill_keeping,
    run_stage_keeping,
    stage_captures,
)
from ..methods.spd_core import ONE_NODE, SpdRun, TreeShape
from ..runtime import trace
from ..runtime.errors import SpdError
from ..runtime.generation import Generation, Halt, first_reservation, start_generation
from ..runtime.sampling import GREEDY, SamplingParams
from ..runtime.staged import StagedTarget
from .comm import END, NONE, PREFILL, REPORT, SHUTDOWN, SLOT, TAG_FORWARD, TAG_TO_ROOT, Link, Message, pack_plan
from .stage import PHASES, sampling_vector


class RootRank:
    """Rank 0: stage 0, the drafter and the core; generate() mirrors spd.generate_spd."""

    def __init__(self, target: StagedTarget, drafter, link: Link):
        self.target, self.drafter, self.link = target, drafter, link
        self.n = target.n_stages
        bounds = [hi for _, hi in target.stage_bounds]
        self.anchors = list(drafter.anchors)
        # Rank s reports its output h_{end of stage s}; the drafter may want it as an anchor. Anchors
        # within stage 0 (SPEED's early exit, and stage 0's own output) are captured here on rank 0.
        self.capture = [stage_captures(target, self.anchors)[0]] + [set()] * (self.n - 1)
        extra = [j for j in self.anchors if j != 0 and j not in bounds and j not in self.capture[0]]
        if extra:
            raise SpdError(f"distributed SPD needs PDM anchors at stage boundaries {bounds}; got {self.anchors}")
        self.anchor_of_rank = {s: bounds[s] for s in range(1, self.n) if bounds[s] in self.anchors}
        self.late = drafter.after_stage0  # SPEED drafts after stage 0, from its output
        self.rank_stats: list[list[float]] = []
        self.store: AnchorStore | None = None
        self.run: SpdRun | None = None
        # Between a request's first message and its END every rank holds its state: an error then
        # leaves the pipeline in an unknown state (a server must stop); before, nothing was sent.
        self.in_request = False

    def _gather(self, run: SpdRun | None):
        """One report from every other rank for this cycle; stores their anchors and returns the
        last rank's choices (None when it ran no exiting slot)."""
        choices, by_index = None, {s.index: s for s in run.sched.in_flight} if run and run.sched else {}
        for s in range(1, self.n):
            msg = self.link.recv(s, TAG_TO_ROOT)
            if msg.kind != REPORT:
                continue  # an idle stage
            if msg.slot == 0:  # the prompt's rows (prefill), by position
                if self.store is not None and s in self.anchor_of_rank:
                    self.store.put(self.anchor_of_rank[s], 0, msg.payload)
            else:
                slot = by_index.get(msg.slot)
                if slot is None:
                    raise SpdError(f"protocol error: rank {s} reports slot {msg.slot}, which is not in flight")
                if self.store is not None and s in self.anchor_of_rank and slot.down_rows:
                    keep_nodes(self.store, run.sched, {self.anchor_of_rank[s]: msg.payload[None]}, slot.down_rows)
            if s == self.n - 1:
                choices = msg.meta or []
        return choices

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens=64, sampling=GREEDY, eos=frozenset(), on_token=None,
                 shape: TreeShape = ONE_NODE, halt: Halt | None = None) -> Generation:
        t, n = self.target, self.n
        # The draft sampler's stream differs from the last rank's (target side): exact in distribution.
        draft_sampling = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p,
                                        None if sampling.seed is None else sampling.seed + 1)
        extra = lookahead_rows(n, shape)
        max_new_tokens, sampler, stop, m = start_generation(t, prompt_ids, max_new_tokens, draft_sampling, eos,
                                                            self.drafter.method + "-dist", lookahead=extra,
                                                            halt=halt)
        # What every rank reserves at prefill (its cache grows past it if the answer runs long).
        self.positions = first_reservation(len(prompt_ids), max_new_tokens, extra)
        self.store = anchor_store(t, self.drafter, self.positions)
        self.sampling = sampling
        self.run = SpdRun(n, prompt_ids, self.drafter, stop, m, self.store, shape, on_token, sampler)
        self.in_request = True
        gen = self.run.drive(self)
        self._drain()
        self.in_request = False
        return gen

    # -- the SpdRun executor hooks --------------------------------------------------------------
    def prefill(self, run: SpdRun) -> int:
        t, link = self.target, self.link
        h = prefill_keeping(t, self.store, run.prompt, [0], self.capture)
        # Rank 0 always takes rank 1's report before sending rank 1 its next message: rank 1 sends its
        # report before receiving, so both sides of the pair post their operations in the same order.
        # NCCL serialises both directions of a rank pair on one stream, and the opposite order
        # (send, then receive, on both sides) deadlocks there; gloo's buffered sends hide it.
        link.send(1, Message(PREFILL, payload=h[0], extra=sampling_vector(self.sampling, self.positions)),
                  TAG_FORWARD)
        choices = self._gather(None)
        link.send(1, Message(NONE), TAG_FORWARD)  # primes rank 1: in cycle c it consumes our cycle c-1
        link.flush()
        if not choices:
            raise SpdError("protocol error: the last rank sent no first token after the prefill")
        return choices[0]

    def cycle(self, run: SpdRun, slot: Slot) -> None:
        t, clock = self.target, run.clock
        h0 = embed_rows(t, self.store, run, slot.rows)
        if not self.late:
            run.grow()
            clock.lap("draft")
        h = run_stage_keeping(t, self.store, 0, h0, slot.layout0, slot.rows, self.capture[0], run.sched)
        clock.lap("stage0")
        if self.late:
            run.grow()
            clock.lap("draft")
        choices = self._gather(run)  # before the send: see the prefill
        clock.lap("wait")
        done = run.settle(choices if run.sched.exiting is not None else None)
        t.compact(done.stage0, 0)
        leaving = done.leaving
        meta, extra = pack_plan(leaving)
        self.link.send(1, Message(SLOT, leaving.index, payload=h[0, leaving.keep], meta=meta, extra=extra),
                       TAG_FORWARD)
        self.link.end_cycle()
        clock.lap("send")

    def _drain(self) -> None:
        """End the request: every rank finishes its in-flight cycles, then acknowledges with its timers."""
        self._gather(self.run)  # rank 1's report of the last cycle comes before our next send (see prefill)
        self.link.send(1, Message(END), TAG_FORWARD)
        stats, open_ranks = {}, list(range(1, self.n))
        while open_ranks:  # round-robin, one report per rank, as in a cycle: draining one rank
            for s in list(open_ranks):  # to its END first would deadlock on the others' sends
                msg = self.link.recv(s, TAG_TO_ROOT)
                if msg.kind == END:
                    stats[s] = msg.payload[0].tolist()
                    open_ranks.remove(s)
                    if msg.meta and msg.extra is not None:  # the rank's trace of this request
                        times = msg.extra.tolist()
                        trace.add(s, f"rank {s}", [(PHASES[c], times[2 * i], times[2 * i + 1])
                                                   for i, c in enumerate(msg.meta)])
        self.link.flush()
        self.rank_stats = [stats[s] for s in range(1, self.n)]

    def heartbeat(self) -> None:
        """A round trip through every rank between requests (`spdecode serve`): the stages, waiting
        for the next request, would otherwise give up after the process group's timeout, and a dead
        rank is found while idle instead of by the next request."""
        self.link.send(1, Message(NONE), TAG_FORWARD)
        for s in range(1, self.n):
            self.link.recv(s, TAG_TO_ROOT)
        self.link.flush()

    def shutdown(self) -> None:
        self.link.send(1, Message(SHUTDOWN), TAG_FORWARD)
        self.link.flush()
