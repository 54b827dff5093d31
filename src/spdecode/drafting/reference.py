"""The `reference:ACC` drafter of tests and benchmarks: it knows the target's greedy continuation and
is right with a chosen probability, behind the CandidateGenerator interface (PipeSpec's first stage)."""

from __future__ import annotations

import random

from ..runtime.sampling import Sampler
from ..runtime.verify import Draft
from .candidates import one_hot


class ReferenceCandidates:
    """Test and benchmark drafter that knows the target's greedy continuation (`set_reference`):
    each drafted token is right with probability `accuracy` (1.0: always right, 0.0: always
    wrong: the reference token + 1). Off the reference path it proposes nothing. `device`: the
    target's, where its one-hot q must be when sampling."""

    def __init__(self, vocab_size: int, accuracy: float = 1.0, seed: int = 0, device="cpu"):
        self.vocab_size, self.accuracy, self.device = vocab_size, accuracy, device
        self.rng = random.Random(seed)
        self.expected: list[int] = []

    def set_reference(self, prompt: list[int], reference: list[int]) -> None:
        self.expected = list(prompt) + list(reference)

    def propose(self, tokens: list[int], gamma: int, sampler: Sampler) -> list[Draft]:
        n = len(tokens)
        if tokens != self.expected[:n]:
            return []
        out = []
        for t in self.expected[n : n + gamma]:
            token = t if self.rng.random() < self.accuracy else (t + 1) % self.vocab_size
            out.append(Draft(token, None if sampler.params.greedy else one_hot(token, self.vocab_size, self.device)))
            if token != t:
                break
        return out

    def reset(self) -> None:
        pass  # the reference comes with each request (set_reference); the draws run on
