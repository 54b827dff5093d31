"""Draft trees: many candidate continuations of one verified token, checked in one target pass.

A tree hangs off a root, the last verified token (not yet in the target's cache, and not one of
the nodes). Node i carries a token and a parent: -1 for the root, otherwise an earlier node, so
node order is a topological order and node 0 is always a child of the root.

In a target pass the root sits at slot and position `start`; node i sits at slot `start + 1 + i`
but at position `start + depth(i)`: slots follow node order, positions follow the tree. Each
node attends to the committed prefix, the root, its ancestors and itself (`ancestor_mask`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DraftTree:
    """Candidate tokens after a root (the last verified token, which is not one of the nodes)."""

    tokens: tuple[int, ...]  # node i's token
    parents: tuple[int, ...]  # node i's parent: -1 = the root, else an earlier node (< i)
    _depths: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _children: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        tokens = tuple(int(t) for t in self.tokens)
        parents = tuple(int(p) for p in self.parents)
        if len(tokens) != len(parents):
            raise ValueError(f"a draft tree needs one parent per token ({len(tokens)} tokens, {len(parents)} parents)")
        depths, children = [], [[] for _ in range(len(tokens) + 1)]  # children[0] = the root's
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i}'s parent must be -1 (the root) or an earlier node (got {p})")
            depths.append(1 if p < 0 else depths[p] + 1)
            children[p + 1].append(i)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "_depths", tuple(depths))
        object.__setattr__(self, "_children", tuple(tuple(c) for c in children))

    def __len__(self) -> int:
        return len(self.tokens)

    def depth(self, i: int) -> int:
        """1 for a child of the root (0 for the root itself, i = -1)."""
        return 0 if i < 0 else self._depths[i]

    @property
    def max_depth(self) -> int:
        return max(self._depths, default=0)

    def children(self, i: int) -> list[int]:
        """Children of node i (i = -1: the root's), in node order."""
        return list(self._children[i + 1])

    def path_to(self, i: int) -> list[int]:
        """Node indices from the root's child down to node i (empty for the root, i = -1)."""
        path = []
        while i >= 0:
            path.append(i)
            i = self.parents[i]
        return path[::-1]

    def positions(self, start: int) -> list[int]:
        """Position ids of the root (at `start`) and every node (start + depth), in slot order."""
        return [start] + [start + d for d in self._depths]

    @classmethod
    def chain(cls, tokens: Iterable[int]) -> DraftTree:
        """A single path: node i is the child of node i - 1."""
        tokens = tuple(tokens)
        return cls(tokens, tuple(range(-1, len(tokens) - 1)))


def ancestor_mask(tree: DraftTree, device=None) -> torch.Tensor:
    """Bool [1+m, 1+m]: row/col 0 = the root; a node sees the root, its ancestors and itself."""
    m = len(tree)
    mask = torch.zeros(1 + m, 1 + m, dtype=torch.bool)
    mask[:, 0] = True
    for i, p in enumerate(tree.parents):
        if p >= 0:
            mask[1 + i] = mask[1 + p]
        mask[1 + i, 1 + i] = True
    return mask if device is None else mask.to(device)


def chunk_tensors(layout, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache_layout.ChunkLayout as tensors: positions [k] of every row from `committed` on, and
    visibility [q, k] of those rows for each chunk row (what run_decoder_layers takes)."""
    positions = torch.tensor(layout.positions, dtype=torch.long, device=device)
    visible = torch.tensor(layout.visible, dtype=torch.bool, device=device).reshape(layout.rows, len(layout.positions))
    return positions, visible
