"""Test oracles: drafters that know the target's greedy continuation and are right as often as asked."""

import random

import torch

from spdecode.runtime.verify import propose


class ReferenceDrafter:
    """Test and benchmark drafter (a SlotDrafter) that knows the target's greedy continuation.

    Below a leaf on the reference path it drafts the right token with probability `accuracy`
    (1.0: an oracle, every draft accepted; 0.0: always wrong) and `branches - 1` wrong siblings;
    below a leaf off it (a wrong draft upstream), wrong tokens, which will be flushed anyway.
    Without a tree budget it drafts one child of the newest leaf (SPD as published); with one,
    `shape.depth` levels below every live leaf, until the budget is spent. The log records each
    draft: (position, tokens before it, token)."""

    method = "spd"
    after_stage0 = False
    anchors: list[int] = []

    def __init__(self, prompt, reference, vocab_size, accuracy=1.0, seed=0, branches=1, sampled=False):
        """`sampled`: one node per slot is drawn from a sharp distribution around the intended
        token (carried as its q), as a trained drafter's is when sampling: the verifier's
        rejection rule then decides it."""
        self.expected = list(prompt) + list(reference)
        self.vocab_size, self.accuracy, self.branches, self.sampled = vocab_size, accuracy, branches, sampled
        self.rng = random.Random(seed)
        self.log = []

    def reset(self, run):
        pass

    def grow(self, run, now):
        sched, shape = run.sched, run.shape
        leaves = [i for i in sched.leaves(now) if sched.nodes[i].position < run.max_position]
        frontier, budget = (leaves if shape.tree else leaves[-1:]), shape.budget
        for _ in range(shape.depth):
            new = []
            for leaf in frontier:
                before = run.tokens_to(leaf)
                n = len(before)
                right = self.expected[n] if n < len(self.expected) and before == self.expected[:n] else None
                tokens = [right] if right is not None and self.rng.random() < self.accuracy else []
                wrong = ((right if right is not None else before[-1]) + 1) % self.vocab_size
                while len(tokens) < (self.branches if shape.tree else 1):
                    if wrong not in tokens and wrong != right:
                        tokens.append(wrong)
                    wrong = (wrong + 1) % self.vocab_size
                for t in tokens[:budget]:
                    draft = None
                    if self.sampled and not shape.tree and run.sampler is not None and not run.sampler.params.greedy:
                        logits = torch.zeros(self.vocab_size)
                        logits[t] = 30.0
                        draft = propose(logits, run.sampler)
                        t = draft.token
                    self.log.append((n, before, t))
                    new.append(sched.add(t, leaf, draft=draft, now=now))
                budget -= min(budget, len(tokens))
            frontier = [i for i in new if sched.nodes[i].position < run.max_position]
            if not budget:
                break
