"""SPD on torch.distributed: one process per stage, the same schedule as the single-process decoder.

Rank s runs stage s. Rank 0 also runs the PDM (so n processes suffice; give stage 0 fewer layers
to balance it) and the schedule; the last rank also runs the LM head and verifies. A cycle:

  rank 0:  PDM drafts the token after the newest one (features from the previous cycle), runs
           stage 0 on the newest token, sends it on with its draft successor attached, then
           gathers one report from every other rank (anchors; the verdict from the last rank);
  rank s:  takes what rank s-1 sent in the previous cycle, runs its layers, passes it on and
           reports its output to rank 0; the last rank verifies the exiting token's successor
           (it travelled with it) and reports the verdict.

So the draft reaches stage 0 with no wait for verification, verification happens where h_L is,
and there is no collective: only point-to-point messages. A rejection bumps the epoch: rank 0
rolls back at once and injects the correction; every other rank rolls back when the first
message of the new epoch reaches it, and rank 0 drops reports of the old epoch (work on flushed
tokens). Greedy output and every counter equal the single-process decoder's.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from .dist_comm import END, NONE, PREFILL, SHUTDOWN, TAG_FORWARD, TAG_TO_ROOT, TOKEN, VERDICT, Link, Message
from .dist_stage import sampling_vector
from .drafters import AnchorStore, DraftContext
from .errors import SpdError
from .generation import Generation, start_generation
from .sampling import GREEDY, SamplingParams
from .schedule import PipelineSchedule
from .spd import Clock, settle
from .staged import StagedTarget
from .verify import Draft, propose


class RootRank:
    """Rank 0: stage 0, the PDM and the schedule; generate() mirrors spd.generate_spd."""

    def __init__(self, target: StagedTarget, drafter, link: Link):
        self.target, self.drafter, self.link = target, drafter, link
        self.n = target.n_stages
        self.epoch = 0
        bounds = [hi for _, hi in target.stage_bounds]
        self.anchors = list(drafter.anchors)
        # Rank s reports its output h_{end of stage s}; the drafter may want it as an anchor.
        # Anchors inside stage 0 (SPEED's early exit) are captured here on rank 0.
        self.capture0 = {j for j in self.anchors if 0 < j < bounds[0]}
        extra = [j for j in self.anchors if j != 0 and j not in bounds and j not in self.capture0]
        if extra:
            raise SpdError(f"distributed SPD needs PDM anchors at stage boundaries {bounds}; got {self.anchors}")
        self.anchor_of_rank = {s: bounds[s] for s in range(self.n) if bounds[s] in self.anchors}
        self.late = getattr(drafter, "after_stage0", False)  # SPEED drafts after stage 0, from its output
        self.rank_stats: list[list[float]] = []

    def _gather(self, store: AnchorStore | None):
        """One report from every other rank for this cycle; the verdict (pos, accepted, token) if valid."""
        verdict = None
        for s in range(1, self.n):
            msg = self.link.recv(s, TAG_TO_ROOT)
            if msg.kind not in (TOKEN, VERDICT) or msg.epoch != self.epoch:
                continue  # an idle stage, or work on tokens a rejection flushed
            if store is not None and s in self.anchor_of_rank:
                store.put(self.anchor_of_rank[s], msg.pos, msg.payload)
            if msg.kind == VERDICT:
                verdict = (msg.pos, bool(msg.flag), msg.token)
        return verdict

    def draft(self, tokens, start, store, sampler, m) -> Draft:
        m.drafts_proposed += 1
        return propose(self.drafter.propose(DraftContext(tokens, start, store)), sampler,
                       self.drafter.vocab, self.target.config.vocab_size)

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens=64, sampling=GREEDY, eos=frozenset(), on_token=None):
        t, n, link = self.target, self.n, self.link
        # The draft sampler's stream differs from the last rank's (target side): exact in distribution.
        draft_sampling = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p,
                                        None if sampling.seed is None else sampling.seed + 1)
        max_new_tokens, sampler, stop, m = start_generation(t, prompt_ids, max_new_tokens, draft_sampling, eos,
                                                            getattr(self.drafter, "method", "spd") + "-dist",
                                                            lookahead=n - 1)
        P = len(prompt_ids)
        store = AnchorStore(self.anchors, t.config.hidden_size, t.dtype, t.device, P + max_new_tokens + n) \
            if self.anchors else None
        self.epoch += 1
        clock = Clock(defaultdict(float))
        h0 = t.embed(torch.tensor([prompt_ids], device=t.device))
        if store and 0 in store.slot:
            store.put(0, 0, h0[0])
        h, got = t.run_stage(0, h0, 0, self.capture0)
        for j, hj in got.items():
            store.put(j, 0, hj[0])
        if store and 0 in self.anchor_of_rank:
            store.put(self.anchor_of_rank[0], 0, h[0])
        # Rank 0 always takes rank 1's report before sending rank 1 its next message: rank 1 sends its
        # report before receiving, so both sides of the pair post their operations in the same order.
        # NCCL serialises both directions of a rank pair on one stream, and the opposite order
        # (send, then receive, on both sides) deadlocks there; gloo's buffered sends hide it.
        link.send(1, Message(PREFILL, self.epoch, payload=h[0], extra=sampling_vector(sampling)), TAG_FORWARD)
        verdict = self._gather(store)
        link.send(1, Message(NONE), TAG_FORWARD)  # primes rank 1: in cycle c it consumes our cycle c-1
        link.flush()
        tokens = list(prompt_ids) + [verdict[2]]
        emitted = [verdict[2]]
        m.prefill_s = time.perf_counter() - clock.t
        if on_token:
            on_token(emitted[-1])

        sched, drafts = PipelineSchedule(n, P), {}
        self.drafter.reset(P)
        inject = (tokens[-1], P)
        t1 = clock.t = time.perf_counter()
        while not stop.done(emitted):
            m.cycles += 1
            x, pos = inject
            e = t.embed(torch.tensor([[x]], device=t.device))
            if store and 0 in store.slot:
                store.put(0, pos, e[0])
            if not self.late:
                draft = self.draft(tokens, sched.start, store, sampler, m)
                clock.lap("draft")
            h, got = t.run_stage(0, e, pos, self.capture0)
            for j, hj in got.items():
                store.put(j, pos, hj[0])
            if store and 0 in self.anchor_of_rank:
                store.put(self.anchor_of_rank[0], pos, h[0])
            clock.lap("stage0")
            if self.late:
                draft = self.draft(tokens, sched.start, store, sampler, m)
                clock.lap("draft")
            verdict = self._gather(store)  # before the send: see the prefill
            link.send(1, Message(TOKEN, self.epoch, pos, x, draft.token, payload=h[0], extra=draft.q), TAG_FORWARD)
            link.end_cycle()
            clock.lap("wait")
            accepted = None
            if sched.exits:
                if verdict is None or verdict[0] != sched.start:
                    raise SpdError(f"protocol error: expected the verdict for position {sched.start}, got {verdict}")
                _, accepted, token = verdict
                m.drafts_verified += 1
                m.drafts_accepted += accepted
                emitted.append(token)
                if on_token:
                    on_token(token)
            elif verdict is not None:
                raise SpdError(f"protocol error: unexpected verdict {verdict} while the pipeline fills")
            outcome = sched.advance(accepted)
            if outcome.rollback_to is not None:
                self.epoch += 1  # everything in flight behind the rejected position is stale now
                t.rollback(outcome.rollback_to)
            inject = settle(outcome, tokens, drafts, draft, token if accepted is False else None)
            clock.lap("bookkeeping")
        m.decode_s = time.perf_counter() - t1
        m.new_tokens, m.stop_reason = len(emitted), stop.reason
        m.phase_s.update(clock.phases)
        self._drain()
        return Generation(emitted, m)

    def _drain(self) -> None:
        """End the request: every rank finishes its in-flight cycles, then acknowledges with its timers."""
        self.link.send(1, Message(END), TAG_FORWARD)
        stats, open_ranks = {}, list(range(1, self.n))
        while open_ranks:  # round-robin, one report per rank, as in a cycle: draining one rank
            for s in list(open_ranks):  # to its END first would deadlock on the others' sends
                msg = self.link.recv(s, TAG_TO_ROOT)
                if msg.kind == END:
                    stats[s] = msg.payload[0].tolist()
                    open_ranks.remove(s)
        self.link.flush()
        self.rank_stats = [stats[s] for s in range(1, self.n)]

    def shutdown(self) -> None:
        self.link.send(1, Message(SHUTDOWN), TAG_FORWARD)
        self.link.flush()
