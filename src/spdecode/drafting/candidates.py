"""Drafters for classic speculative decoding: one class per way of proposing a block of tokens.

Each is a `protocols.CandidateGenerator` (in the spirit of HF's candidate generators): `reset()`,
and `propose(tokens, gamma, sampler)` -> up to gamma drafted tokens after `tokens`, each with the
distribution it was drawn from (None: greedy). A deterministic drafter (prompt lookup) gives a
one-hot q, which keeps rejection sampling exact; q lives on the target's device (verification
subtracts it from the target's p there). Prompt lookup also proposes a draft tree (`propose_tree`):
every earlier continuation of the context's tail as a branch.
"""

from __future__ import annotations

import torch

from ..runtime.sampling import Sampler
from ..runtime.staged import StagedTarget
from ..runtime.tree import DraftTree
from ..runtime.verify import Draft, propose
from .tree_build import best_first_tree


def one_hot(token: int, size: int, device="cpu") -> torch.Tensor:
    q = torch.zeros(size, device=device)
    q[token] = 1.0
    return q


def trie(sequences: list[list[int]], budget: int) -> DraftTree | None:
    """The token sequences as branches after one root, shared prefixes merged, in order, until
    `budget` nodes; earlier sequences keep their nodes when the budget runs out."""
    tokens, parents, index = [], [], {}  # index: (parent node, token) -> node
    for seq in sequences:
        parent = -1
        for t in seq:
            node = index.get((parent, t))
            if node is None:
                if len(tokens) == budget:
                    break
                node = index[(parent, t)] = len(tokens)
                tokens.append(t)
                parents.append(parent)
            parent = node
    return DraftTree(tuple(tokens), tuple(parents)) if tokens else None


class PromptLookupCandidates:
    """Copy what followed the latest earlier occurrence of the context's last n-gram (no parameters).
    `device`: the target's, where its one-hot q must be when sampling."""

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1, device="cpu"):
        self.vocab_size, self.max_ngram, self.min_ngram = vocab_size, max_ngram, min_ngram
        self.device = device

    def propose(self, tokens: list[int], gamma: int, sampler: Sampler) -> list[Draft]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the most recent match first
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + gamma]
                    greedy = sampler.params.greedy
                    return [Draft(t, None if greedy else one_hot(t, self.vocab_size, self.device)) for t in follow]
        return []

    def reset(self) -> None:
        pass  # it keeps nothing between generations

    def propose_tree(self, tokens: list[int], budget: int, depth: int, topk: int = 0) -> DraftTree | None:
        """Up to `budget` nodes, `depth` deep: what followed each earlier occurrence of the longest
        tail n-gram that occurs before, most recent first, merged where continuations agree (a trie)."""
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            follows = [tokens[start + n : start + n + depth] for start in range(len(tokens) - n - 1, -1, -1)
                       if tokens[start : start + n] == tail]
            if follows:
                return trie(follows, budget)
        return None


class CachedLM:
    """A causal LM (or its first `layers` layers with the final norm and head: an early exit) over
    a static cache of its own; `next_logits` feeds only what the cache does not already hold."""

    def __init__(self, model, layers: int | None = None):
        L = model.config.num_hidden_layers
        self.layers = L if layers is None else layers
        self.t = StagedTarget(model, [self.layers, L - self.layers] if self.layers < L else 1)
        self.held: list[int] = []  # tokens whose K/V the cache holds, at positions 0..len-1

    @property
    def context_length(self) -> int:
        return self.t.context_length

    def reset(self) -> None:
        self.held = []
        self.t.rollback(0)

    @torch.inference_mode()
    def next_logits(self, tokens: list[int], extra: list[int] = ()) -> torch.Tensor:
        """Logits [len(extra) + 1, V]: the next-token distribution after tokens[-1] and after each
        of `extra` (tokens not known to be right yet, e.g. drafts under verification)."""
        seq = list(tokens) + list(extra)
        keep = 0
        for a, b in zip(self.held, seq, strict=False):  # the cached prefix that still matches
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)
        self.t.reserve(len(seq) + 1)
        self.t.rollback(keep)
        h = self.t.run_layers(0, self.layers, self.t.embed(torch.tensor([seq[keep:]], device=self.t.device)), keep)
        self.held = seq
        return self.t.logits(h[:, -(len(extra) + 1):])[0]

    @torch.inference_mode()
    def tree_logits(self, tokens: list[int], tree: DraftTree) -> torch.Tensor:
        """Logits [1 + m, V] after tokens[-1] (row 0) and after each node of a tree rooted there,
        in one pass over the tree; afterwards the cache holds tokens[:-1] again."""
        self.next_logits(tokens[:-1])  # the committed prefix in the cache; the root comes with the tree
        start = len(tokens) - 1
        self.t.reserve(start + 1 + len(tree.tokens))
        ids = torch.tensor([[tokens[-1], *tree.tokens]], device=self.t.device)
        h = self.t.run_stage_tree(0, self.t.embed(ids), start, tree)  # stage 0: the drafter's layers
        self.t.rollback(start)
        return self.t.logits(h)[0]


class ModelCandidates:
    """A small causal LM drafts autoregressively over a cache of its own (`CachedLM`).

    Also the early-exit self-draft: the target's first k layers with its final norm and LM head.
    """

    def __init__(self, model, layers: int | None = None):
        self.lm = CachedLM(model, layers)

    def propose(self, tokens: list[int], gamma: int, sampler: Sampler) -> list[Draft]:
        out: list[Draft] = []
        for _ in range(gamma):
            out.append(propose(self.lm.next_logits(list(tokens) + [d.token for d in out])[-1], sampler))
        return out

    def reset(self) -> None:
        self.lm.reset()

    def propose_tree(self, tokens: list[int], budget: int, depth: int, topk: int = 4) -> DraftTree | None:
        """A dynamic tree (`tree_build.best_first_tree`) from this model's distributions: one
        pass over the tree grown so far per level."""
        def expand(tree: DraftTree, frontier: list[int]) -> torch.Tensor:
            logits = self.lm.tree_logits(tokens, tree)
            return torch.log_softmax(logits[[1 + i for i in frontier]], dim=-1)

        return best_first_tree(expand, budget, depth, topk)


def early_exit_candidates(model, layers: int) -> ModelCandidates:
    L = model.config.num_hidden_layers
    if not 1 <= layers < L:
        from ..runtime.errors import SpdError

        raise SpdError(f"early-exit needs 1..{L - 1} layers (got {layers})")
    return ModelCandidates(model, layers)
