"""Speculative Pipeline Decoding in one process: the schedule run on the staged target.

The stages run one after another here, so this path shows the algorithm, its acceptance and its
per-cycle overhead, not the wall-clock gain (that needs one process per stage, see the
distributed executor). Output is exactly AR's: every emitted token was verified by the target's
logits computed over the same KV history as AR (greedy), or passed the rejection sampler (sampling).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .drafters import AnchorStore, DraftContext
from .generation import Generation, start_generation
from .sampling import GREEDY, SamplingParams
from .schedule import PipelineSchedule
from .staged import StagedTarget
from .verify import Draft, propose, verify


class Clock:
    """Adds wall time to named phases of the metrics."""

    def __init__(self, phases):
        self.phases, self.t = phases, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] += now - self.t
        self.t = now


def settle(outcome, tokens: list[int], drafts: dict, draft: Draft, correction: int | None) -> tuple[int, int]:
    """End of a cycle, for every executor: the draft enters (accept, or the pipeline still fills),
    or the flushed positions are dropped and the correction enters. Returns (token, position)
    that stage 0 takes next cycle; `tokens` and the unverified `drafts` are updated in place."""
    if outcome.rollback_to is None:
        if outcome.verified_position != len(tokens):  # n == 1 verified this draft already
            drafts[len(tokens)] = draft
        tokens.append(draft.token)
        return draft.token, len(tokens) - 1
    q = outcome.rollback_to
    del tokens[q:]
    tokens.append(correction)
    drafts.clear()
    return correction, q


@torch.inference_mode()
def generate_spd(
    target: StagedTarget,
    drafter,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    sampling: SamplingParams = GREEDY,
    eos: set[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    n, dev = target.n_stages, target.device
    # In-flight drafts run up to n-1 positions past the last emitted token: keep them in context.
    max_new_tokens, sampler, stop, m = start_generation(target, prompt_ids, max_new_tokens, sampling, eos,
                                                        getattr(drafter, "method", "spd"),
                                                        lookahead=n - 1)
    P = len(prompt_ids)
    anchors = list(drafter.anchors)
    store = AnchorStore(anchors, target.config.hidden_size, target.dtype, dev, P + max_new_tokens + n) \
        if anchors else None
    # Which anchors each stage produces: h_j comes out of layer j-1.
    capture = [{j for j in anchors if lo < j <= hi} for lo, hi in target.stage_bounds]

    # Prefill: the whole prompt through every stage in one batched pass, keeping its anchors.
    t0 = time.perf_counter()
    h = target.embed(torch.tensor([prompt_ids], device=dev))
    if store and 0 in store.slot:
        store.put(0, 0, h[0])
    for s in range(n):
        h, got = target.run_stage(s, h, 0, capture[s])
        for j, hj in got.items():
            store.put(j, 0, hj[0])
    tokens = list(prompt_ids) + [sampler.choose(target.logits(h[:, -1])[0])]
    emitted = [tokens[-1]]
    m.prefill_s = time.perf_counter() - t0
    if on_token:
        on_token(emitted[-1])

    def inject(token: int, pos: int) -> torch.Tensor:
        """A token entering stage 0: its embedding is both stage 0's input and anchor h_0."""
        e = target.embed(torch.tensor([[token]], device=dev))
        if store and 0 in store.slot:
            store.put(0, pos, e[0])
        return e

    sched = PipelineSchedule(n, P)
    carry: list[torch.Tensor | None] = [None] * n  # carry[s]: what stage s produced last cycle
    stage0_input = inject(tokens[P], P)
    drafts: dict[int, Draft] = {}  # unverified drafts by position
    drafter.reset(P)
    t1 = time.perf_counter()
    clock = Clock(m.phase_s)
    # SPD's PDM drafts concurrently with the stages, from what exists before the cycle; SPEED's
    # drafter needs the newest token's state from stage 0 of this very cycle, so it runs after.
    late = getattr(drafter, "after_stage0", False)

    def draft_next() -> Draft:
        m.drafts_proposed += 1
        return propose(drafter.propose(DraftContext(tokens, sched.start, store)), sampler,
                       drafter.vocab, target.config.vocab_size)

    while not stop.done(emitted):
        m.cycles += 1
        # 1. Draft the token after the newest.
        if not late:
            draft = draft_next()
            clock.lap("draft")
        # 2. Every busy stage advances its token by one stage (deepest first, see schedule.work).
        for s, pos in sched.work():
            h_in = stage0_input if s == 0 else carry[s - 1]
            out, got = target.run_stage(s, h_in, pos, capture[s])
            carry[s] = out
            for j, hj in got.items():
                store.put(j, pos, hj[0])
        clock.lap("stages")
        if late:
            draft = draft_next()
            clock.lap("draft")
        # 3. The oldest token left the last stage: its logits decide the next position.
        accepted = None
        if sched.exits:
            vpos = sched.verify_position
            candidate = drafts.pop(vpos) if vpos in drafts else draft  # n == 1: this cycle's draft
            accepted, token = verify(target.logits(carry[n - 1])[0, -1], candidate, sampler)
            m.drafts_verified += 1
            m.drafts_accepted += accepted
            emitted.append(token)
            if on_token:
                on_token(token)
            clock.lap("verify")
        outcome = sched.advance(accepted)
        # 4. Accept (or still filling): the draft enters stage 0. Reject: flush and roll back.
        if outcome.rollback_to is not None:
            target.rollback(outcome.rollback_to)
        stage0_input = inject(*settle(outcome, tokens, drafts, draft, token if accepted is False else None))
        clock.lap("bookkeeping")
    m.decode_s = time.perf_counter() - t1
    m.new_tokens, m.stop_reason = len(emitted), stop.reason
    return Generation(emitted, m)
