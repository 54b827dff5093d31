"""The online guard of `--method auto`: a speculative run that drafts badly ends as plain AR.

While a speculative method runs, the guard watches its tokens per cycle. Once WINDOW cycles have
run, if both the last WINDOW cycles and the whole run so far average fewer tokens per cycle than
the break-even (what a cycle must carry to match AR's speed on this machine, from the machine
profile), it halts the method and AR decodes the rest of the request from the tokens so far: a
prefill over the prompt and those tokens, then one token per step. The switch is lossless: every
token before it is the target's own (greedy: AR's tokens; sampling: drawn from the target's
distribution), and AR continues from exactly that prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..runtime.generation import Generation, Halt
from ..runtime.metrics import Metrics
from ..runtime.sampling import GREEDY, SamplingParams

WINDOW = 32  # cycles: long enough that a few hard tokens do not end speculation
GUARD_REASON = "guard"


class Guard(Halt):
    """A Halt that also sets itself when the run's tokens per cycle stay below `break_even`; it
    mirrors an outside Halt (`outer`: a server's stop string or a gone client)."""

    def __init__(self, break_even: float, outer: Halt | None = None, window: int = WINDOW):
        super().__init__()
        self.break_even, self.outer, self.window = break_even, outer, window
        self.after: list[int] = []  # tokens emitted by the end of each cycle (index 0: the prefill's)

    def is_set(self) -> bool:
        if self.outer is not None and self.outer.is_set():
            self.reason = self.outer.reason
            return True
        return super().is_set()

    def watch(self, tokens: list[int], metrics: Metrics) -> None:
        c = metrics.cycles  # the cycle under way (or just ended)
        while len(self.after) <= c:
            self.after.append(len(tokens))
        self.after[c] = len(tokens)
        done = c - 1  # cycles surely over
        if done < self.window or super().is_set():
            return
        recent = (self.after[done] - self.after[done - self.window]) / self.window
        overall = (self.after[done] - self.after[0]) / done
        if recent < self.break_even and overall < self.break_even:
            self.set(GUARD_REASON)


def guarded(run: Callable[..., Generation], ar: Callable[..., Generation], break_even: float,
            window: int = WINDOW):
    """`run` (a speculative generate function) under a Guard; `ar`: plain AR on the same target,
    which finishes a request the guard stopped."""

    def generate(prompt_ids, max_new_tokens, sampling=GREEDY, eos=frozenset(), on_token=None, halt=None):
        guard = Guard(break_even, halt, window)
        gen = run(prompt_ids, max_new_tokens, sampling, eos, on_token=on_token, halt=guard)
        if gen.metrics.stop_reason != GUARD_REASON:
            return gen
        # The guard may trip on the very token that ends the request: that end wins.
        if gen.tokens[-1] in eos or len(gen.tokens) >= max_new_tokens:
            gen.metrics.stop_reason = "eos" if gen.tokens[-1] in eos else "length"
            return gen
        rest = ar(list(prompt_ids) + gen.tokens, max_new_tokens - len(gen.tokens), fresh(sampling, gen.tokens),
                  eos, on_token=on_token, halt=halt)
        return Generation(gen.tokens + rest.tokens, joined(gen.metrics, rest.metrics, len(gen.tokens)))

    return generate


def fresh(sampling: SamplingParams, tokens: list[int]) -> SamplingParams:
    """The AR part's sampling: a seeded run gets a seed of its own for it, so that its draws do
    not repeat the stream the speculative part already consumed (reused draws would tie the new
    tokens to the old ones)."""
    if sampling.seed is None:
        return sampling
    return replace(sampling, seed=(sampling.seed * 1_000_003 + len(tokens)) % (2 ** 63))


def joined(spec: Metrics, ar: Metrics, switched_at: int) -> Metrics:
    """One generation's metrics: the speculative part's counts, then AR's; AR's prefill over the
    tokens so far is decode time (the request paid it) and one cycle (it made one token)."""
    m = replace(spec, phase_s=spec.phase_s.copy())
    m.new_tokens = spec.new_tokens + ar.new_tokens
    m.cycles = spec.cycles + 1 + ar.cycles
    m.decode_s = spec.decode_s + ar.prefill_s + ar.decode_s
    m.phase_s["guard_ar"] = ar.prefill_s + ar.decode_s
    m.stop_reason = ar.stop_reason
    m.guard_fallback_at = switched_at
    return m
