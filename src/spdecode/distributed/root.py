"""SPD on torch.distributed: one process per stage, the same schedule as the single-process decoder.

Rank s runs stage s. Rank 0 also runs the drafter (so n processes suffice; give stage 0 fewer
layers to balance it) and drives the SPD core (methods/spd_core.py) as its executor; the last rank
also runs the LM head and verifies. A cycle:

  rank 0:  the drafter drafts the token after the newest one (features from the previous cycle),
           stage 0 runs on the newest token, rank 0 gathers one report from every other rank
           (anchors; the verdict from the last rank), then sends the token on with its draft
           successor attached;
  rank s:  takes what rank s-1 sent in the previous cycle, runs its layers, passes it on and
           reports its output to rank 0; the last rank verifies the exiting token's successor
           (it travelled with it) and reports the verdict.

Rank 0 receives from rank 1 before sending to it, and rank 1 sends before receiving: both sides
of the one pair that talks both ways post in the same order, which NCCL needs (it runs both
directions of a pair on one stream, and a send waits for its receive).

So the draft reaches stage 0 with no wait for verification, verification happens where h_L is,
and there is no collective: only point-to-point messages. A rejection bumps the epoch: rank 0
rolls back at once and injects the correction; every other rank rolls back when the first
message of the new epoch reaches it, and rank 0 drops reports of the old epoch (work on flushed
tokens). Greedy output and every counter equal the single-process decoder's.
"""

from __future__ import annotations

import torch

from ..drafting.drafters import AnchorStore
from ..methods.spd_core import DrafterSource, SpdRun, Verdict, anchor_store, enter, run_stage_keeping, stage_captures
from ..runtime.errors import SpdError
from ..runtime.generation import Generation, start_generation
from ..runtime.sampling import GREEDY, SamplingParams
from ..runtime.staged import StagedTarget
from .comm import END, NONE, PREFILL, SHUTDOWN, TAG_FORWARD, TAG_TO_ROOT, TOKEN, VERDICT, Link, Message
from .stage import sampling_vector


class RootRank:
    """Rank 0: stage 0, the PDM and the schedule; generate() mirrors spd.generate_spd."""

    def __init__(self, target: StagedTarget, drafter, link: Link):
        self.target, self.drafter, self.link = target, drafter, link
        self.n = target.n_stages
        self.epoch = 0
        bounds = [hi for _, hi in target.stage_bounds]
        self.anchors = list(drafter.anchors)
        # Rank s reports its output h_{end of stage s}; the drafter may want it as an anchor. Anchors
        # within stage 0 (SPEED's early exit, and stage 0's own output) are captured here on rank 0.
        self.capture0 = stage_captures(target, self.anchors)[0]
        extra = [j for j in self.anchors if j != 0 and j not in bounds and j not in self.capture0]
        if extra:
            raise SpdError(f"distributed SPD needs PDM anchors at stage boundaries {bounds}; got {self.anchors}")
        self.anchor_of_rank = {s: bounds[s] for s in range(1, self.n) if bounds[s] in self.anchors}
        self.late = drafter.after_stage0  # SPEED drafts after stage 0, from its output
        self.rank_stats: list[list[float]] = []
        self.store: AnchorStore | None = None
        self.run: SpdRun | None = None

    def _gather(self):
        """One report from every other rank for this cycle; the verdict (pos, accepted, token) if valid."""
        verdict = None
        for s in range(1, self.n):
            msg = self.link.recv(s, TAG_TO_ROOT)
            if msg.kind not in (TOKEN, VERDICT) or msg.epoch != self.epoch:
                continue  # an idle stage, or work on tokens a rejection flushed
            if self.store is not None and s in self.anchor_of_rank:
                self.store.put(self.anchor_of_rank[s], msg.pos, msg.payload)
            if msg.kind == VERDICT:
                verdict = (msg.pos, bool(msg.flag), msg.token)
        return verdict

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens=64, sampling=GREEDY, eos=frozenset(), on_token=None) -> Generation:
        t, n = self.target, self.n
        # The draft sampler's stream differs from the last rank's (target side): exact in distribution.
        draft_sampling = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p,
                                        None if sampling.seed is None else sampling.seed + 1)
        max_new_tokens, sampler, stop, m = start_generation(t, prompt_ids, max_new_tokens, draft_sampling, eos,
                                                            self.drafter.method + "-dist", lookahead=n - 1)
        # Every position this request can write, in every rank's cache: each reserves it once.
        self.positions = len(prompt_ids) + max_new_tokens + n
        self.store = anchor_store(t, self.drafter, self.positions)
        self.sampling = sampling
        self.epoch += 1
        source = DrafterSource(self.drafter, self.store, sampler, t.config.vocab_size)
        self.run = SpdRun(n, prompt_ids, source, stop, m, on_token)
        gen = self.run.drive(self)
        self._drain()
        return gen

    # -- the SpdRun executor hooks --------------------------------------------------------------
    def prefill(self, run: SpdRun) -> int:
        t, link = self.target, self.link
        h = enter(t, self.store, run.prompt, 0)
        h = run_stage_keeping(t, self.store, 0, h, 0, self.capture0)
        # Rank 0 always takes rank 1's report before sending rank 1 its next message: rank 1 sends its
        # report before receiving, so both sides of the pair post their operations in the same order.
        # NCCL serialises both directions of a rank pair on one stream, and the opposite order
        # (send, then receive, on both sides) deadlocks there; gloo's buffered sends hide it.
        link.send(1, Message(PREFILL, self.epoch, payload=h[0], extra=sampling_vector(self.sampling, self.positions)),
                  TAG_FORWARD)
        verdict = self._gather()
        link.send(1, Message(NONE), TAG_FORWARD)  # primes rank 1: in cycle c it consumes our cycle c-1
        link.flush()
        if verdict is None:
            raise SpdError("protocol error: the last rank sent no first token after the prefill")
        return verdict[2]

    def cycle(self, run: SpdRun, token: int, position: int) -> Verdict | None:
        t, clock = self.target, run.clock
        e = enter(t, self.store, [token], position)
        if not self.late:
            run.propose_draft()
            clock.lap("draft")
        h = run_stage_keeping(t, self.store, 0, e, position, self.capture0)
        clock.lap("stage0")
        if self.late:
            run.propose_draft()
            clock.lap("draft")
        draft = run.draft
        verdict = self._gather()  # before the send: see the prefill
        self.link.send(1, Message(TOKEN, self.epoch, position, token, draft.token, payload=h[0], extra=draft.q),
                       TAG_FORWARD)
        self.link.end_cycle()
        clock.lap("wait")
        if verdict is None:
            return None
        # The last rank reports the position of the token that exited; its logits decided the next one.
        pos, accepted, out = verdict
        return Verdict.single(pos + 1, accepted, out)

    def rollback(self, position: int) -> None:
        self.epoch += 1  # everything in flight behind the rejected position is stale now
        self.target.rollback(position)

    def _drain(self) -> None:
        """End the request: every rank finishes its in-flight cycles, then acknowledges with its timers."""
        self._gather()  # rank 1's report of the last cycle comes before our next send (see prefill)
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
