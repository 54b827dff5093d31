"""Drafters for classic speculative decoding: one class per way of proposing a block of tokens.

The interface follows HF's candidate generators, two methods:
  propose(tokens, gamma, sampler) -> [Draft]   up to gamma drafted tokens after `tokens`, each with
                                               the distribution it was drawn from (None: greedy)
  update(tokens, accepted)                     what verification kept (a drafter may adapt)
A deterministic drafter (prompt lookup) gives a one-hot q, which keeps rejection sampling exact.
"""

from __future__ import annotations

import torch

from .sampling import Sampler
from .staged import StagedTarget
from .verify import Draft, propose


def one_hot(token: int, size: int) -> torch.Tensor:
    q = torch.zeros(size)
    q[token] = 1.0
    return q


class PromptLookupCandidates:
    """Copy what followed the latest earlier occurrence of the context's last n-gram (no parameters)."""

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1):
        self.vocab_size, self.max_ngram, self.min_ngram = vocab_size, max_ngram, min_ngram

    def propose(self, tokens: list[int], gamma: int, sampler: Sampler) -> list[Draft]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the most recent match first
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + gamma]
                    q = (lambda t: None) if sampler.params.greedy else (lambda t: one_hot(t, self.vocab_size))
                    return [Draft(t, q(t)) for t in follow]
        return []

    def update(self, tokens: list[int], accepted: int) -> None:
        pass


class ModelCandidates:
    """A small causal LM drafts autoregressively; `StagedTarget` over it keeps its own static cache.

    Also the early-exit self-draft: the target's first k layers with its final norm and LM head,
    over a cache of their own (`StagedTarget(model, [k, L-k])`, stage 0 only).
    """

    def __init__(self, target: StagedTarget, layers: int | None = None):
        self.t = target
        self.layers = layers if layers is not None else target.n_layers
        self.done: list[int] = []  # tokens whose K/V the drafter holds, at positions 0..len-1

    def _sync(self, tokens: list[int]) -> None:
        """Keep the cached prefix that still matches `tokens`, feed the rest except the last token."""
        keep = 0
        for a, b in zip(self.done, tokens, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)
        self.t.rollback(keep)
        if keep < len(tokens) - 1:
            ids = torch.tensor([tokens[keep:-1]], device=self.t.device)
            self.t.run_layers(0, self.layers, self.t.embed(ids), keep)
        self.done = list(tokens[:-1])

    @torch.inference_mode()
    def propose(self, tokens: list[int], gamma: int, sampler: Sampler) -> list[Draft]:
        t = self.t
        t.reserve(len(tokens) + gamma + 1)
        if not self.done:
            t.rollback(0)
        self._sync(tokens)
        out, last = [], tokens[-1]
        for i in range(gamma):
            pos = len(tokens) - 1 + i
            h = t.run_layers(0, self.layers, t.embed(torch.tensor([[last]], device=t.device)), pos)
            d = propose(t.logits(h)[0, -1], sampler)
            out.append(d)
            self.done.append(last)
            last = d.token
        return out

    def update(self, tokens: list[int], accepted: int) -> None:
        pass  # the next propose() re-syncs the cache against the verified tokens

    def reset(self) -> None:
        self.done = []


def early_exit_candidates(model, layers: int) -> ModelCandidates:
    L = model.config.num_hidden_layers
    if not 1 <= layers < L:
        from .errors import SpdError

        raise SpdError(f"early-exit needs 1..{L - 1} layers (got {layers})")
    return ModelCandidates(StagedTarget(model, [layers, L - layers]), layers)
