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

import math
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
                    bonus: dict | None = None, first_topk: int | None = None,
                    record: list | None = None) -> list[Grown]:
    """The kept grown nodes, parents first (`parent`: an index into the returned list).
    `leaves`: (key, score) to grow from; `vocab`: when expand's distributions are over a draft
    vocabulary, its token ids (index -> the target's id). `expand_all`: the first level expands
    every starting node, not only the `topk` best (SPD's pipeline: a node the walk may stop at
    needs a child in the next slot, whatever its score). `bonus`: per starting leaf, a log-weight
    added to its children's rank when the budget is cut (not to their scores): in a pipeline a
    child the walk steps into also saves a refill; a node's descendants outrank it never.
    `first_topk`: children per starting leaf at the first level (default `topk`). `record`: gets,
    per frontier row expanded, the log-probabilities of the children taken from it, in order
    (with the walks, what the planner's replay needs to grow the same trees)."""
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
            values = top.values.tolist()
            if record is not None:
                record.append(values)
            for lp, t in zip(values, ids.tolist(), strict=True):
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


# -- growth below SPD's live tree (every drafter of the engine core that grows trees: the PDM, and
#    the planner's stand-in, which must grow the same shapes) ----------------------------------------
def newest_leaf(run, now: bool):
    """One node per slot (SPD as published): the leaf the next node hangs below (None: none may)."""
    leaves = [i for i in run.sched.leaves(now) if run.sched.nodes[i].position < run.max_position]
    return leaves[-1] if leaves else None


def tree_starts(run, ids: list[int]) -> list[int]:
    """The live nodes `ids` a tree may grow below. A tree grows below any live node, leaves or not:
    in a pipeline the walk may stop at a node whose children in its own slot were wrong, and only a
    child in a later slot then saves a refill. Nodes past the last position worth drafting are out."""
    return [i for i in ids if run.sched.nodes[i].position < run.max_position]


def grow_below(run, starts: list[int], expand: Expand, vocab: torch.Tensor | None, now: bool) -> None:
    """Grow run.shape's tree below `starts` (EAGLE-2's best-first levels) and add it to the schedule.
    `expand` must keep a starting node's existing children out (they are not drafted again)."""
    sched, shape = run.sched, run.shape
    # A child of a node in flight is where a walk ending there steps on; without it a refill of
    # n - 1 cycles follows. Worth about n tokens instead of one: its rank is raised by log n.
    step = {i: math.log(run.n) for i in starts if sched.nodes[i].slot >= 0} if run.n > 1 else {}
    # In a pipeline a walk that stops at a node steps on only into a child of a later slot: the
    # first level may give a node in flight as many such children as its probability earns.
    kept = grow_best_first([(i, sched.nodes[i].score) for i in starts], expand, shape.budget, shape.depth,
                           shape.topk, vocab, expand_all=run.n > 1, bonus=step,
                           first_topk=shape.budget if run.n > 1 else None, record=run.metrics.draft_scores)
    added: list[int | None] = []
    for g in kept:
        parent = g.leaf if g.parent is None else added[g.parent]
        if parent is None or sched.nodes[parent].position >= run.max_position:
            added.append(None)
            continue
        added.append(sched.add(g.token, parent, g.score, now=now))
