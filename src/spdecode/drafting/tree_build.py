"""Dynamic draft trees (EAGLE-2, Li et al. arXiv 2406.16858): grow the tree where the drafter is
confident, under a node budget, from the drafter's own distributions.

Each level expands the `topk` frontier nodes with the highest cumulative log-probability (the
drafter's estimate that the whole path is right), each into its `topk` most likely children.
After `depth` levels the `budget` nodes with the highest cumulative log-probability are kept.
A child never scores above its parent (log-probabilities are <= 0), so that set contains every
kept node's ancestors: it is a tree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..runtime.tree import DraftTree

# expand(tree, frontier) -> log-probabilities [len(frontier), V]: the drafter's next-token
# distribution after each frontier node (-1: the root) of the tree grown so far.
Expand = Callable[[DraftTree, list[int]], torch.Tensor]


def best_first_tree(expand: Expand, budget: int, depth: int, topk: int,
                    vocab: torch.Tensor | None = None) -> DraftTree | None:
    """`vocab`: when expand's distributions are over a draft vocabulary, its token ids (index ->
    the target's id); None: over the target's vocabulary."""
    tokens: list[int] = []
    parents: list[int] = []
    score: list[float] = []
    frontier = [-1]
    for _ in range(depth):
        logprobs = expand(DraftTree(tuple(tokens), tuple(parents)), frontier)
        grown = []
        for row, node in enumerate(frontier):
            base = 0.0 if node < 0 else score[node]
            top = torch.topk(logprobs[row].float(), min(topk, logprobs.shape[-1]))
            ids = top.indices if vocab is None else vocab[top.indices]
            for lp, t in zip(top.values.tolist(), ids.tolist(), strict=True):
                grown.append(len(tokens))
                tokens.append(t)
                parents.append(node)
                score.append(base + lp)
        # Ties go to the earlier node, so a parent always ranks before its equal-scoring child.
        frontier = sorted(grown, key=lambda i: (-score[i], i))[:topk]
    if not tokens:
        return None
    keep = sorted(sorted(range(len(tokens)), key=lambda i: (-score[i], i))[:budget])
    new = {old: i for i, old in enumerate(keep)}
    return DraftTree(tuple(tokens[i] for i in keep), tuple(-1 if parents[i] < 0 else new[parents[i]] for i in keep))
