"""Speculative Pipeline Decoding in one process: the SPD core (spd_core.py) driven over the staged
target, running the stages one after another.

This path shows the algorithm, its acceptance and its per-cycle overhead, not the wall-clock
gain, which needs one process per stage (the distributed executor). Output is exactly AR's. Every
emitted token was verified by the target's logits, computed over the same KV history as AR
(greedy), or passed the rejection sampler (sampling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..runtime.generation import Generation, start_generation
from ..runtime.sampling import GREEDY, Sampler, SamplingParams
from ..runtime.staged import StagedTarget
from ..runtime.verify import verify
from .spd_core import DrafterSource, SpdRun, Verdict, anchor_store, enter, run_stage_keeping, stage_captures


class LocalPipeline:
    """The executor of SpdRun in one process: every stage on the same staged target."""

    def __init__(self, target: StagedTarget, drafter, store, sampler: Sampler):
        self.target, self.store, self.sampler = target, store, sampler
        self.late = drafter.after_stage0
        self.capture = stage_captures(target, list(drafter.anchors))
        self.carry: list[torch.Tensor | None] = [None] * target.n_stages  # what stage s produced last cycle

    def prefill(self, run: SpdRun) -> int:
        """The whole prompt through every stage in one batched pass, keeping its anchors."""
        t = self.target
        h = enter(t, self.store, run.prompt, 0)
        for s in range(t.n_stages):
            h = run_stage_keeping(t, self.store, s, h, 0, self.capture[s])
        return self.sampler.choose(t.logits(h[:, -1])[0])

    def cycle(self, run: SpdRun, token: int, position: int) -> Verdict | None:
        t, clock = self.target, run.clock
        stage0_input = enter(t, self.store, [token], position)
        clock.lap("bookkeeping")
        # The PDM drafts concurrently with the stages, from what exists before the cycle; SPEED's
        # drafter needs the newest token's state from stage 0 of this very cycle, so it runs after.
        if not self.late:
            run.propose_draft()
            clock.lap("draft")
        for s, pos in run.sched.work():  # deepest first: see schedule.work
            h_in = stage0_input if s == 0 else self.carry[s - 1]
            self.carry[s] = run_stage_keeping(t, self.store, s, h_in, pos, self.capture[s])
        clock.lap("stages")
        if self.late:
            run.propose_draft()
            clock.lap("draft")
        if not run.sched.exits:
            return None
        # The oldest token left the last stage: its logits decide the next position.
        accepted, out = verify(t.logits(self.carry[-1])[0, -1], run.candidate, self.sampler)
        clock.lap("verify")
        return Verdict.single(run.sched.verify_position, accepted, out)

    def rollback(self, position: int) -> None:
        self.target.rollback(position)


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
    n = target.n_stages
    # In-flight drafts run up to n-1 positions past the last emitted token: keep them in context.
    max_new_tokens, sampler, stop, m = start_generation(target, prompt_ids, max_new_tokens, sampling, eos,
                                                        drafter.method, lookahead=n - 1)
    store = anchor_store(target, drafter, len(prompt_ids) + max_new_tokens + n)
    source = DrafterSource(drafter, store, sampler, target.config.vocab_size)
    run = SpdRun(n, prompt_ids, source, stop, m, on_token)
    return run.drive(LocalPipeline(target, drafter, store, sampler))
