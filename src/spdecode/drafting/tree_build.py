"""Dynamic draft trees (EAGLE-2, Li et al. arXiv 2406.16858): grow the tree where the drafter is
confident, under a node budget, from the drafter's own distributions.

Growth starts from leaves of an existing tree (a root alone, or the live leaves of SPD's tree in
flight), each with a score: the drafter's cumulative log-probability of the path to it. Each
level expands the `topk` frontier nodes with the highest score, each into its `topk` most
likely children; the next frontier is the `topk` best of those children. After `depth` levels
the `budget` grown nodes with the highest score are kept. A child never scores above its parent
(log-probabilities are <= 0), so that set holds every kept node's grown ancestors: a forest
hanging below the starting leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..runtime.tree import DraftTree


@dataclass(frozen=True)
class Grown:
    parent: int | None  # index of a grown node, or None: hangs below the starting leaf `leaf`
    leaf: object
    token: int
    score: float


# A frontier entry: ("leaf", key) for a starting leaf, ("new", i) for the i-th grown node.
Ref = tuple[str, object]
# expand(grown so far, frontier) -> log-probabilities [len(frontier), V]: the drafter's
# next-token distribution after each frontier node.
Expand = Callable[[list[Grown], list[Ref]], torch.Tensor]


def grow_best_first(leaves: list[tuple[object, float]], expand: Expand, budget: int, depth: int, topk: int,
                    vocab: torch.Tensor | None = None, expand_all: bool = False,
                    bonus: dict | None = None, first_topk: int | None = None) -> list[Grown]:
    """The kept grown nodes, parents first (`parent`: an index into the returned list).
    `leaves`: (key, score) to grow from; `vocab`: when expand's distributions are over a draft
    vocabulary, its token ids (index -> the target's id). `expand_all`: the first level expands
    every starting node, not only the `topk` best (SPD's pipeline: a node the walk may stop at
    needs a child in the next slot, whatever its score). `bonus`: per starting leaf, a log-weight
    added to its children's rank when the budget is cut (not to their scores): in a pipeline a
    child the walk steps into also saves a refill; a node's descendants outrank it never.
    `first_topk`: children per starting leaf at the first level (default `topk`)."""
    grown: list[Grown] = []
    base = dict(leaves)
    # Ties go to the earlier entry, so a parent always ranks before its equal-scoring child.
    order = sorted(range(len(leaves)), key=lambda i: -leaves[i][1])[:None if expand_all else topk]
    frontier: list[Ref] = [("leaf", leaves[i][0]) for i in order]
    for level in range(depth):
        if not frontier:
            break
        logprobs = expand(grown, frontier)
        width = topk if level or first_topk is None else first_topk
        new = []
        for row, (kind, ref) in enumerate(frontier):
            start = base[ref] if kind == "leaf" else grown[ref].score
            top = torch.topk(logprobs[row].float(), min(width, logprobs.shape[-1]))
            ids = top.indices if vocab is None else vocab[top.indices]
            for lp, t in zip(top.values.tolist(), ids.tolist(), strict=True):
                new.append(len(grown))
                grown.append(Grown(None if kind == "leaf" else ref, ref if kind == "leaf" else grown[ref].leaf,
                                   int(t), start + lp))
        frontier = [("new", i) for i in sorted(new, key=lambda i: (-grown[i].score, i))[:topk]]
    bonus = bonus or {}

    def rank(i):  # a node's bonus is its first-level ancestor's: descendants never outrank their parents
        g = grown[i]
        while g.parent is not None:
            g = grown[g.parent]
        return -(grown[i].score + bonus.get(g.leaf, 0.0)), i

    keep = sorted(sorted(range(len(grown)), key=rank)[:budget])
    index = {old: k for k, old in enumerate(keep)}
    return [Grown(None if g.parent is None else index[g.parent], g.leaf, g.token, g.score)
            for g in (grown[i] for i in keep)]


def as_tree(grown: list[Grown]) -> DraftTree:
    """Nodes grown below one root as a DraftTree (-1: the root)."""
    return DraftTree(tuple(g.token for g in grown), tuple(-1 if g.parent is None else g.parent for g in grown))


def best_first_tree(expand: Callable[[DraftTree, list[int]], torch.Tensor], budget: int, depth: int, topk: int,
                    vocab: torch.Tensor | None = None) -> DraftTree | None:
    """A dynamic tree below one root. `expand(tree, frontier)`: log-probabilities after each
    frontier node (-1: the root) of the tree grown so far (its nodes in growth order)."""
    def on_tree(grown: list[Grown], frontier: list[Ref]) -> torch.Tensor:
        return expand(as_tree(grown), [-1 if kind == "leaf" else i for kind, i in frontier])

    kept = grow_best_first([("root", 0.0)], on_tree, budget, depth, topk, vocab)
    return as_tree(kept) if kept else None
