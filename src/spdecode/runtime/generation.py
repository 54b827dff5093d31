"""The pieces every decoding method shares: prompt checks, the stop rule, and the result type."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field

from .errors import SpdError
from .metrics import Metrics


@dataclass
class Generation:
    tokens: list[int]  # new tokens only, EOS included when the model emitted it (as HF generate)
    metrics: Metrics = field(default_factory=Metrics)


def check_prompt(prompt_ids: list[int], max_new_tokens: int, context_length: int) -> int:
    """Validate a prompt; return max_new_tokens clamped to what fits in the model's context."""
    if not prompt_ids:
        raise SpdError("the prompt is empty")
    if max_new_tokens < 1:
        raise SpdError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    room = context_length - len(prompt_ids)
    if room < 1:
        raise SpdError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {context_length} tokens"
        )
    if max_new_tokens > room:
        warnings.warn(f"max_new_tokens {max_new_tokens} clamped to {room} to fit the model's context",
                      stacklevel=3)
    return min(max_new_tokens, room)


RESERVE_AHEAD = 512  # answer positions reserved up front; the KV cache and anchor store grow past them


def first_reservation(prompt: int, max_new_tokens: int, lookahead: int = 0) -> int:
    """Positions a request reserves before it decodes: the prompt, the first RESERVE_AHEAD tokens
    of its answer and the drafts in flight. Not the whole budget: a request that may run to the end
    of the context (no max_tokens) but stops early must not hold a context's worth of memory; the
    buffers double as a long answer needs them (a few copies, amortised)."""
    return prompt + min(max_new_tokens, RESERVE_AHEAD) + lookahead


def start_generation(target, prompt_ids: list[int], max_new_tokens: int, sampling, eos, method: str,
                     lookahead: int = 0, n_stages: int | None = None, halt: Halt | None = None):
    """What every decoder does first: check the prompt, make room, reset the cache, and set up
    (max_new_tokens, sampler, stop rule, metrics).

    `lookahead`: how many positions past the last emitted token a method may write (SPD's
    in-flight drafts: n-1; classic SD's block: gamma). Those must fit in the context too, so the
    token budget is clamped by that much; the highest position written is then P + budget +
    lookahead - 1, which is exactly the room reserved. `halt`: an outside stop (StopRule).
    """
    from .metrics import Metrics
    from .sampling import Sampler

    max_new_tokens = check_prompt(prompt_ids, max_new_tokens, target.context_length - lookahead)
    target.reserve(first_reservation(len(prompt_ids), max_new_tokens, lookahead))
    target.rollback(0)
    m = Metrics(method=method, n_stages=target.n_stages if n_stages is None else n_stages,
                prompt_tokens=len(prompt_ids))
    return max_new_tokens, Sampler(sampling, target.device), StopRule(set(eos), max_new_tokens, halt, m), m


def eos_ids(model, tokenizer) -> set[int]:
    """The ids HF generate stops on: the generation config's EOS, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id if tokenizer is not None else None
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


class Halt:
    """An outside request to end a generation after the token it is set on (a served request's stop
    string matched, or its client went away). Set from the token callback, the decoder stops at that
    very token (every method checks its StopRule after each token it streams); set from another
    thread, at the next token."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def watch(self, tokens: list[int], metrics: Metrics) -> None:
        """Called with the run's tokens and counters whenever its stop rule is asked (a Halt that
        decides by itself, methods.guard.Guard, looks at them; a plain one does not)."""


class StopRule:
    """Decides, token by token, whether generation is over (EOS, the token budget, or a Halt)."""

    def __init__(self, eos: set[int], max_new_tokens: int, halt: Halt | None = None, metrics: Metrics | None = None):
        self.eos, self.max_new_tokens, self.halt, self.metrics = eos, max_new_tokens, halt, metrics
        self.reason = ""

    def done(self, tokens: list[int]) -> bool:
        if self.halt is not None and self.metrics is not None and not self.reason:
            self.halt.watch(tokens, self.metrics)
        if self.reason:
            pass
        elif self.halt is not None and self.halt.is_set():
            self.reason = self.halt.reason
        elif tokens and tokens[-1] in self.eos:
            self.reason = "eos"
        elif len(tokens) >= self.max_new_tokens:
            self.reason = "length"
        return bool(self.reason)


def prefill(target, prompt_ids: list[int], sampler, metrics: Metrics, on_token=None, observe=None,
            anchors: Collection[int] = ()) -> int:
    """The prompt through every layer in one batched pass (its K/V cached), then the first token
    from the last position's logits, timed as the metrics' prefill and streamed. `observe(0, {j:
    h_j [P, H]})` receives the prompt's hidden states at `anchors` (a feature-level drafter's)."""
    import time

    import torch

    t0 = time.perf_counter()
    ids = torch.tensor([prompt_ids], device=target.device)
    if observe is None:
        hidden = target.forward(ids, 0)
    else:
        h0 = target.embed(ids)
        hidden, got = target.run_layers(0, target.n_layers, h0, 0, capture=set(anchors))
        observe(0, {j: (h0 if j == 0 else got[j])[0] for j in anchors})
    token = sampler.choose(target.logits(hidden[:, -1])[0])
    metrics.prefill_s = time.perf_counter() - t0
    if on_token:
        on_token(token)
    return token
