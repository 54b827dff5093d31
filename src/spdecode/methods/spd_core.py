"""The one SPD cycle. Every executor (one process, rank 0 of torch.distributed, the exact replay)
drives this core and keeps no cycle loop of its own.

The core owns what does not depend on where the stages run: the schedule, the token list
(prompt, verified tokens, in-flight drafts), the unverified drafts, the emitted tokens, the stop
rule, the counters and the end-of-cycle settlement. An executor supplies three hooks
(`SpdExecutor`): the prefill, one cycle of stage work, and the rollback of its caches.
Within its cycle, the executor calls `run.propose_draft()` at the moment its drafter can run
(before the stages for the PDM, after stage 0 for SPEED). It ends the cycle with a `Verdict` when
the oldest in-flight token exits the last stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..drafting.drafters import AnchorStore, DraftContext
from ..runtime.errors import SpdError
from ..runtime.generation import Generation, StopRule
from ..runtime.metrics import Clock, Metrics
from ..runtime.sampling import Sampler
from ..runtime.verify import Draft, propose
from .schedule import PipelineSchedule


@dataclass(frozen=True)
class Verdict:
    """What the target decided where a token left the pipeline.

    `tokens` are final from `position` on. The first `accepted` of them are the drafts that were
    in flight there, taken as proposed. If every token is such a draft, all in-flight work behind
    them survives. Otherwise the last token is the target's correction, and everything in flight
    after it is flushed. Today's schedule decides one token per verdict (the settlement refuses
    more). A draft tree's verdict names a path of several tokens; the tree schedule will add
    which in-flight branches survive it, beside the path, and settle both.
    """

    position: int
    tokens: tuple[int, ...]
    accepted: int

    @classmethod
    def single(cls, position: int, accepted: bool, token: int) -> Verdict:
        return cls(position, (token,), int(accepted))

    @property
    def in_flight_survives(self) -> bool:
        return self.accepted == len(self.tokens)


class SpdExecutor(Protocol):
    def prefill(self, run: SpdRun) -> int:
        """Run the prompt through every stage; return the first generated token."""

    def cycle(self, run: SpdRun, token: int, position: int) -> Verdict | None:
        """One pipeline cycle: `token` enters stage 0 at `position`, every busy stage advances,
        and `run.propose_draft()` is called once. Return the verdict iff `run.sched.exits`."""

    def rollback(self, position: int) -> None:
        """Forget every position >= `position` (the flushed in-flight work)."""


class DraftSource(Protocol):
    def reset(self, prompt_len: int) -> None: ...

    def propose(self, run: SpdRun) -> Draft:
        """The draft for position `run.sched.draft_position`."""


class SpdRun:
    """One SPD generation: tokens, drafts, schedule, stop rule and counters."""

    def __init__(self, n_stages: int, prompt_ids: list[int], drafts: DraftSource, stop: StopRule, metrics: Metrics,
                 on_token: Callable[[int], None] | None = None):
        self.prompt = list(prompt_ids)
        self.tokens = list(prompt_ids)  # positions 0..: prompt, verified tokens, in-flight drafts
        self.emitted: list[int] = []
        self.pending: dict[int, Draft] = {}  # drafts in flight, not verified yet, by position
        self.sched = PipelineSchedule(n_stages, len(prompt_ids))
        self.source, self.stop, self.metrics, self.on_token = drafts, stop, metrics, on_token
        self.clock = Clock(metrics.phase_s)
        self.draft: Draft | None = None  # this cycle's draft

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    # -- called by executors ------------------------------------------------------------------
    def propose_draft(self) -> Draft:
        """Draft the token after the newest one, from what exists now."""
        self.metrics.drafts_proposed += 1
        self.draft = self.source.propose(self)
        return self.draft

    @property
    def candidate(self) -> Draft:
        """The draft that the exiting token verifies (n == 1: this cycle's own draft)."""
        return self.pending.get(self.sched.verify_position, self.draft)

    # -- the loop -------------------------------------------------------------------------
    def drive(self, executor: SpdExecutor) -> Generation:
        m = self.metrics
        t0 = time.perf_counter()
        first = executor.prefill(self)
        self.tokens.append(first)
        self._emit(first)
        m.prefill_s = time.perf_counter() - t0
        self.source.reset(self.prompt_len)
        token, position = first, self.prompt_len
        t1 = self.clock.t = time.perf_counter()
        while not self.stop.done(self.emitted):
            m.cycles += 1
            self.draft = None
            verdict = executor.cycle(self, token, position)
            if self.draft is None:
                raise SpdError("executor error: the cycle proposed no draft")
            token, position = self._settle(verdict, executor)
            self.clock.lap("bookkeeping")
        m.decode_s = time.perf_counter() - t1
        m.new_tokens, m.stop_reason = len(self.emitted), self.stop.reason
        return Generation(self.emitted, m)

    def _emit(self, token: int) -> None:
        self.emitted.append(token)
        if self.on_token:
            self.on_token(token)

    def _settle(self, verdict: Verdict | None, executor: SpdExecutor) -> tuple[int, int]:
        """End of a cycle: count and emit the verdict, advance the schedule, and return the
        (token, position) that enters stage 0 next cycle: this cycle's draft, or the correction
        after a rejection (then every layer forgets the flushed positions)."""
        sched, m = self.sched, self.metrics
        accepted = None
        if sched.exits:
            if verdict is None or verdict.position != sched.verify_position:
                raise SpdError(f"protocol error: expected the verdict for position {sched.verify_position}, "
                               f"got {verdict}")
            if len(verdict.tokens) != 1:
                raise SpdError("this schedule verifies one token per cycle")
            accepted = verdict.in_flight_survives
            drafted = self.candidate.token
            if accepted != (verdict.tokens[0] == drafted):
                raise SpdError(f"protocol error: the verdict {verdict} contradicts the draft in flight there "
                               f"({drafted})")
            m.drafts_verified += verdict.accepted + (not accepted)
            m.drafts_accepted += verdict.accepted
            self.pending.pop(verdict.position, None)
            for t in verdict.tokens:
                if self.stop.done(self.emitted):
                    break
                self._emit(t)
        elif verdict is not None:
            raise SpdError(f"protocol error: unexpected verdict {verdict} while the pipeline fills")
        outcome = sched.advance(accepted)
        if outcome.rollback_to is None:  # accepted, or still filling: the draft enters
            if outcome.verified_position != len(self.tokens):  # (n == 1 verified this draft already)
                self.pending[len(self.tokens)] = self.draft
            self.tokens.append(self.draft.token)
            return self.draft.token, len(self.tokens) - 1
        q = outcome.rollback_to
        executor.rollback(q)
        del self.tokens[q:]
        self.tokens.extend(verdict.tokens)
        self.pending.clear()
        return verdict.tokens[-1], q


# -- shared by the executors that run real stages ----------------------------------------------
class DrafterSource:
    """Drafts from an SPD drafter (`drafters.py`): its logits, warped and drawn by the sampler."""

    def __init__(self, drafter, store: AnchorStore | None, sampler: Sampler, vocab_size: int):
        self.drafter, self.store, self.sampler, self.vocab_size = drafter, store, sampler, vocab_size

    def reset(self, prompt_len: int) -> None:
        self.drafter.reset(prompt_len)

    def propose(self, run: SpdRun) -> Draft:
        logits = self.drafter.propose(DraftContext(run.tokens, run.sched.start, self.store))
        return propose(logits, self.sampler, self.drafter.vocab, self.vocab_size)


def anchor_store(target, drafter, positions: int) -> AnchorStore | None:
    """Buffers for the hidden states the drafter reads, for every position a generation can write."""
    anchors = list(drafter.anchors)
    return AnchorStore(anchors, target.config.hidden_size, target.dtype, target.device, positions) if anchors else None


def stage_captures(target, anchors: list[int]) -> list[set[int]]:
    """Per stage, the anchors it produces: h_j comes out of layer j-1, so stage [lo, hi) gives
    lo < j <= hi (h_0, the embedding, is stored on entry)."""
    return [{j for j in anchors if lo < j <= hi} for lo, hi in target.stage_bounds]


def enter(target, store: AnchorStore | None, ids: list[int], position: int) -> torch.Tensor:
    """Tokens entering stage 0 at `position`..: their embedding is stage 0's input and anchor h_0."""
    h = target.embed(torch.tensor([ids], device=target.device))
    if store is not None and 0 in store.slot:
        store.put(0, position, h[0])
    return h


def run_stage_keeping(target, store: AnchorStore | None, stage: int, h: torch.Tensor, position: int,
                      capture: set[int]) -> torch.Tensor:
    """Run one stage and keep the anchors it produces (h_j comes out of layer j-1)."""
    out, got = target.run_stage(stage, h, position, capture)
    for j, hj in got.items():
        store.put(j, position, hj[0])
    return out
