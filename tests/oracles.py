"""Test oracles: drafters that know the target's greedy continuation and are right as often as asked."""

import random

import torch

from spdecode.drafting.drafters import DraftContext


class ReferenceDrafter:
    """Test and benchmark drafter that knows the target's greedy continuation.

    On the reference path it proposes the right token with probability `accuracy` (1.0: an
    oracle, every draft accepted; 0.0: always wrong); off it (a wrong draft upstream), it
    proposes a wrong token, which will be flushed anyway.
    """

    method = "spd"
    after_stage0 = False
    anchors: list[int] = []
    vocab = None

    def __init__(self, prompt: list[int], reference: list[int], vocab_size: int, accuracy: float = 1.0, seed=0):
        self.expected = list(prompt) + list(reference)
        self.vocab_size, self.accuracy = vocab_size, accuracy
        self.rng = random.Random(seed)

    def reset(self, prompt_len: int) -> None:
        pass

    def propose(self, ctx: DraftContext) -> torch.Tensor:
        n = ctx.draft_position
        right = self.expected[n] if n < len(self.expected) and ctx.tokens == self.expected[:n] else None
        if right is not None and self.rng.random() < self.accuracy:
            token = right
        else:
            token = ((right if right is not None else ctx.tokens[-1]) + 1) % self.vocab_size
        logits = torch.zeros(self.vocab_size)
        logits[token] = 30.0
        return logits
