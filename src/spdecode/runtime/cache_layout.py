"""Where the rows of a draft tree sit in a KV cache, and what each one sees: pure bookkeeping (no
torch), shared by the schedule (every stage's cache) and the draft module's own cache.

A cache holds, in slot order, `committed` verified tokens at slot == position, then rows of
nodes in flight, each at its own position. A chunk appended after them sees the verified prefix
by position (and sliding window) and, of the in-flight rows, only its ancestors and itself. A
node is anything with `parent` (a node id, -1 for none), `position` and, to settle, `state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(Enum):
    DRAFT = "draft"  # unverified, descends from the root
    VERIFIED = "verified"  # decided by the target
    DEAD = "dead"  # does not descend from the root: its work is wasted


@dataclass(frozen=True)
class ChunkLayout:
    """Where a chunk of rows goes in a cache and what each row sees.

    Slots [0, committed) hold verified tokens at slot == position; slots committed..start-1 are
    in-flight rows and start..start+q-1 the chunk. `positions` gives the position of every row
    from `committed` on (in-flight rows, then the chunk); `visible[i][k]` whether chunk row i
    sees row committed + k (its ancestors and itself). The verified prefix is seen by position
    (and window) alone."""

    start: int
    committed: int
    positions: tuple[int, ...]
    visible: tuple[tuple[bool, ...], ...]

    @property
    def rows(self) -> int:
        return len(self.visible)


@dataclass(frozen=True)
class Compaction:
    """Move the K/V in slots `src` to dst, dst+1, ... and make the cache's length dst + len(src)."""

    dst: int
    src: tuple[int, ...]
    length: int  # the cache's length before (nothing to do when src is already in place and complete)

    @property
    def is_identity(self) -> bool:
        return self.src == tuple(range(self.dst, self.length))


class CacheView:
    """What one cache holds: `committed` verified tokens at slot == position, then `rows` (node ids)."""

    def __init__(self, committed: int):
        self.committed = committed
        self.rows: list[int] = []

    @property
    def length(self) -> int:
        return self.committed + len(self.rows)

    def append(self, ids: list[int], nodes) -> ChunkLayout:
        """The layout of `ids` (a chunk in parents-first order) written after the current rows."""
        start, keys = self.length, self.rows + list(ids)
        index = {k: i for i, k in enumerate(keys)}
        visible = []
        for i in ids:
            row = [False] * len(keys)
            node = i
            while node in index:  # itself, then its ancestors among the rows
                row[index[node]] = True
                node = nodes[node].parent
            visible.append(tuple(row))
        self.rows = keys
        return ChunkLayout(start, self.committed, tuple(nodes[k].position for k in keys), tuple(visible))

    def settle(self, nodes) -> Compaction:
        """Keep the verified rows (at slot == position from `committed` on), then the live ones."""
        verified = [r for r in self.rows if nodes[r].state is State.VERIFIED]
        live = [r for r in self.rows if nodes[r].state is State.DRAFT]
        if [nodes[r].position for r in verified] != list(range(self.committed, self.committed + len(verified))):
            raise RuntimeError(f"verified rows at positions {[nodes[r].position for r in verified]} do not continue "
                               f"the verified prefix of {self.committed}")
        where = {r: self.committed + i for i, r in enumerate(self.rows)}
        plan = Compaction(self.committed, tuple(where[r] for r in verified + live), self.length)
        self.committed += len(verified)
        self.rows = live
        return plan


