"""Plain autoregressive decoding on the staged target: the baseline and the losslessness oracle."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..runtime import trace
from ..runtime.generation import Generation, Halt, prefill, start_generation
from ..runtime.sampling import GREEDY, SamplingParams
from ..runtime.staged import StagedTarget


@torch.inference_mode()
def generate_ar(
    target: StagedTarget,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    sampling: SamplingParams = GREEDY,
    eos: set[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
    halt: Halt | None = None,
) -> Generation:
    max_new_tokens, sampler, stop, m = start_generation(target, prompt_ids, max_new_tokens, sampling, eos, "ar",
                                                        halt=halt)
    P = len(prompt_ids)

    tokens = [prefill(target, prompt_ids, sampler, m, on_token)]
    t1 = t_token = time.perf_counter()
    while not stop.done(tokens):
        pos = P + len(tokens) - 1
        hidden = target.forward(torch.tensor([[tokens[-1]]], device=target.device), pos)
        tokens.append(sampler.choose(target.logits(hidden[:, -1])[0]))
        m.cycles += 1
        if trace.active():
            now = time.perf_counter()
            trace.span("token", t_token, now)
            t_token = now
        if on_token:
            on_token(tokens[-1])
    m.decode_s = time.perf_counter() - t1
    m.new_tokens, m.stop_reason = len(tokens), stop.reason
    return Generation(tokens, m)
