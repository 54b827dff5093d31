"""SPD's pipeline schedule over draft trees, as a pure state machine (no torch): which nodes enter
the pipeline, what every stage's KV cache holds, what the target decided, what survives.

Terms.
- Verified tokens: the prompt and every token the target decided. The last one is the ROOT: its
  successor is still open. Every token after the prompt is a node; the root is one too, either
  in flight or waiting to enter (the first token, and the target's correction after a miss).
- Draft nodes: candidate tokens, each with a parent node and the position after it. The live
  tree is the root and its draft descendants; a node that does not descend from the root is dead.
- Slot: the nodes that enter stage 0 in one cycle (slot c enters in cycle c). Stage s runs slot
  c - s in cycle c, so slot c leaves the last stage at the end of cycle c + n - 1 with the
  target's logits for each of its rows.

A cycle:
  1. draft trees: the drafter grows the live tree into this cycle's own slot, from everything
     the last cycle left (its verdict, and every stage's output); then
  2. `enter`: the waiting nodes become this cycle's slot and enter stage 0;
  3. SPD as published (one node per slot) instead drafts the next slot's node now, a cycle
     ahead (SPEED: after stage 0); every stage runs its slot;
  4. `finish`: if the exiting slot holds the root, the target's choice at each of its rows
     decides a walk (`walk`): from the root into the child that carries the target's token,
     on through children in the same slot; a child in a later slot becomes the new root (its
     subtree survives, in flight, and the work goes on with no bubble); no such child: the
     target's token is a correction, the new root, waiting to enter (every draft dies).

Caches. Every stage's cache holds, in slot order, the verified tokens it has run at slot ==
position, then the rows of nodes still in flight, each at its own position (`CacheView`). A
chunk sees the verified prefix by position and window, and of the in-flight rows only its
ancestors (`ChunkLayout`). After a verdict a view keeps its verified rows (moved to slot ==
position), then its live rows in order, and forgets the rest (`Compaction`): what a fresh run
over the verified prefix and the surviving nodes would hold. Nothing accepted is computed twice.

Timing of the stages (what the distributed engine does, and the one-process engine copies):
stage 0 runs slot c before the verdict of cycle c is known, and forgets its dead rows after it;
slot c then travels on with only the rows still live, and stages s >= 1 apply each verdict just
before the slot that follows it. So stages 1..n-1 all see the same view at the same point of
the slot sequence (`down`), and stage 0 its own (`stage0`); every plan is computed once, here.

With one node per slot this is SPD as published (each exit verifies the next slot's single node:
one cycle per accepted token, n per rejection, `tau`); with n = 1 it is speculative decoding over
a draft tree (each cycle one pass over the root and its subtree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..runtime.cache_layout import CacheView, ChunkLayout, Compaction, State


def tau(alpha: float, n: int) -> float:
    """Top-1 SPD's theoretical speedup over AR: n stage-costs per AR step times steady-state tokens
    per cycle 1 / (1 + (n-1)(1-alpha)) (an accepted draft costs a cycle, a rejection a refill)."""
    return n / (1 + (n - 1) * (1 - alpha))


@dataclass
class Node:
    token: int
    parent: int  # node id (-1: the first token's parent, the prompt)
    position: int
    score: float = 0.0  # the drafter's log-probability of the path to it (ranks leaves)
    draft: Any = None  # what it was drawn from (a Draft with q) when it was sampled, for the verifier
    slot: int = -1  # the slot it entered with (-1: not yet)
    state: State = State.DRAFT
    children: list[int] = field(default_factory=list)


@dataclass
class Slot:
    """The nodes that entered stage 0 in cycle `index`, and (once it left stage 0) the plan of
    the stages after it: before running it a stage applies `compaction`, then runs `down_rows`
    (the rows of `rows` still live then: `keep` indexes them) at `layout`."""

    index: int
    rows: list[int]
    layout0: ChunkLayout
    keep: list[int] = field(default_factory=list)
    down_rows: list[int] = field(default_factory=list)
    compaction: Compaction | None = None
    layout: ChunkLayout | None = None
    successors: list[Any] = field(default_factory=list)  # per down row: its single sampled child's draft, or None


@dataclass(frozen=True)
class Verdict:
    """What the target decided where a slot left the pipeline: the walk `accepted` these draft
    nodes (after the root), then the target's `token`, carried by the in-flight or drafted node
    `node` (the new root) or by none (a correction: the new root waits to enter)."""

    slot: int
    accepted: tuple[int, ...]
    token: int
    node: int | None
    tokens: tuple[int, ...]  # emitted: the accepted nodes' tokens, then `token`
    tried: int  # nodes on the walk that had a live child (each one verification, accepted or not)
    # Per step the walk took, the taken child's rank among its live siblings by score (0: the
    # drafter's best): a third of the steps of spd's trees go elsewhere, where less is in flight.
    ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class Settlement:
    """The end of a cycle: the verdict (None: nothing exited, or the exiting slot was dead), the
    compaction stage 0 applies now, and the slot leaving stage 0 with its plan for the rest."""

    verdict: Verdict | None
    stage0: Compaction
    leaving: Slot | None


class TreeSchedule:
    def __init__(self, n_stages: int, root_token: int, root_position: int):
        """`root_token`: the first generated token (chosen from the prefill) at `root_position`,
        the prompt's length; every stage already holds the prompt."""
        if n_stages < 1:
            raise ValueError("n_stages must be >= 1")
        self.n = n_stages
        self.nodes: dict[int, Node] = {}
        self.root = self._new(root_token, -1, root_position, 0.0, None)
        self.nodes[self.root].state = State.VERIFIED
        self.cycle = 0  # the cycle running now; slot `cycle` is entering
        self.waiting: list[int] = [self.root]  # nodes that enter stage 0 at the next `enter`
        self.drafted: list[int] = []  # nodes drafted this cycle, to enter the next one
        self.in_flight: list[Slot] = []  # entered and not exited, oldest first
        self.stage0, self.down = CacheView(root_position), CacheView(root_position)
        self._drafts: set[int] = set()  # ids of the live draft nodes
        self._died: list[int] = []  # nodes that died since `settled_nodes` was last asked
        self._between = True  # after `finish` (or before the first cycle) until the next `enter`
        self.wasted = 0  # stage-rows of nodes that died (work a better draft would have saved)

    def _new(self, token: int, parent: int, position: int, score: float, draft) -> int:
        i = len(self.nodes)
        self.nodes[i] = Node(int(token), parent, position, score, draft)
        if parent >= 0:
            self.nodes[parent].children.append(i)
        return i

    # -- what the drafter sees and adds ------------------------------------------------------
    @property
    def root_waits(self) -> bool:
        """The root has not entered the pipeline yet (the first token, or a correction)."""
        return self.nodes[self.root].slot < 0 and self.root in self.waiting

    def live(self) -> list[int]:
        """The root and its draft descendants, parents first (in entry order, the waiting and
        drafted nodes last)."""
        order = [i for s in self.in_flight for i in s.rows] + self.waiting + self.drafted
        return [i for i in order if self.nodes[i].state is not State.DEAD
                and (i == self.root or self.nodes[i].state is State.DRAFT)]

    def depth(self, i: int) -> int:
        """Stages node i has passed before the work of this cycle, or between two cycles of the next
        one (0: waiting, entering now, or drafted)."""
        slot = self.nodes[i].slot
        return 0 if slot < 0 else self.cycle + self._between - slot

    def add(self, token: int, parent: int, score: float = 0.0, draft=None, now: bool = False) -> int:
        """A draft node under the live node `parent`, entering with the next slot (now: with this
        cycle's, before `enter`: then the parent must have entered or be entering too)."""
        p = self.nodes.get(parent)
        if p is None or p.state is State.DEAD or (p.state is State.VERIFIED and parent != self.root):
            raise ValueError(f"node {parent} is not live: a draft must hang below the root")
        if now and parent in self.drafted:
            raise ValueError("a node entering now cannot hang below a node that enters later")
        if any(self.nodes[c].token == int(token) and self.nodes[c].state is State.DRAFT for c in p.children):
            raise ValueError(f"node {parent} already has a draft child {int(token)}")
        i = self._new(token, parent, p.position + 1, score, draft)
        self._drafts.add(i)
        (self.waiting if now else self.drafted).append(i)
        return i

    # -- the cycle ---------------------------------------------------------------------------
    def enter(self) -> Slot:
        """Start a cycle: the waiting nodes enter stage 0 as this cycle's slot."""
        self.cycle += 1
        self._between = False
        rows = [i for i in self.waiting if self.nodes[i].state is not State.DEAD]
        for i in rows:
            self.nodes[i].slot = self.cycle
        slot = Slot(self.cycle, rows, self.stage0.append(rows, self.nodes))
        self.in_flight.append(slot)
        self.waiting = []
        return slot

    def stage_slots(self) -> list[tuple[int, Slot]]:
        """(stage, slot) pairs of this cycle, deepest stage first: a single process must run stage s
        on what stage s-1 produced last cycle before stage s-1 overwrites it."""
        by_index = {s.index: s for s in self.in_flight}
        return [(s, by_index[self.cycle - s]) for s in reversed(range(self.n)) if self.cycle - s in by_index]

    @property
    def exiting(self) -> Slot | None:
        """The slot that leaves the last stage at the end of this cycle."""
        s = self.in_flight[0] if self.in_flight else None
        return s if s is not None and s.index == self.cycle - self.n + 1 else None

    def exit_rows(self) -> list[int]:
        """The rows the last stage runs this cycle (what the target's choices are for)."""
        s = self.exiting
        if s is None:
            return []
        return s.rows if self.n == 1 else s.down_rows

    def finish(self, choices: list[int] | None) -> Settlement:
        """End the cycle with the target's token for each row of the exiting slot (None when no
        slot exits): walk, prune, and plan every cache's compaction and the leaving slot's rows."""
        exiting, rows = self.exiting, self.exit_rows()
        if exiting is None:
            if choices is not None:
                raise ValueError("no slot exits this cycle: there is nothing to choose for")
        elif choices is None or len(choices) != len(rows):
            raise ValueError(f"the exiting slot has {len(rows)} rows: give one choice per row (got {choices})")
        verdict = None
        if exiting is not None:
            self.in_flight.pop(0)
            if self.root in rows:
                verdict = self._walk(exiting.index, rows, [int(c) for c in choices])
        compact0 = self.stage0.settle(self.nodes)
        leaving = self._leave() if self.n > 1 else None
        self.waiting += [i for i in self.drafted if self.nodes[i].state is not State.DEAD]
        self.drafted = []
        self._between = True
        return Settlement(verdict, compact0, leaving)

    def _walk(self, slot: int, rows: list[int], choices: list[int]) -> Verdict:
        choice = dict(zip(rows, choices, strict=True))
        here, accepted, tried, ranks = self.root, [], 0, []
        while True:
            y = choice[here]
            kids = [c for c in self.nodes[here].children if self.nodes[c].state is State.DRAFT]
            tried += bool(kids)
            nxt = next((c for c in kids if self.nodes[c].token == y), None)
            if nxt is None:  # a correction: the new root waits to enter
                self.root, node = self._new(y, here, self.nodes[here].position + 1, 0.0, None), None
                self.waiting, self.drafted = [self.root], []
                break
            ranks.append(self.ranked_children(here).index(nxt))
            self._verify(nxt)
            if nxt not in choice:  # in flight behind this slot, or drafted: the new root
                self.root = node = nxt
                break
            accepted.append(nxt)
            here = nxt
        self.nodes[self.root].state = State.VERIFIED
        self._prune()
        tokens = tuple(self.nodes[i].token for i in accepted) + (y,)
        return Verdict(slot, tuple(accepted), y, node, tokens, tried, tuple(ranks))

    def _verify(self, i: int) -> None:
        self.nodes[i].state = State.VERIFIED
        self._drafts.discard(i)

    def _prune(self) -> None:
        """Every draft that does not descend from the root dies (the stages it ran are counted)."""
        for i in list(self._drafts):
            a = self.nodes[i].parent
            while a != self.root and a in self._drafts:
                a = self.nodes[a].parent
            if a != self.root:
                self.nodes[i].state = State.DEAD
                self._died.append(i)
                if self.nodes[i].slot >= 0:
                    self.wasted += self._stages_run(i)
        self._drafts = {i for i in self._drafts if self.nodes[i].state is State.DRAFT}

    def _stages_run(self, i: int) -> int:
        node = self.nodes[i]
        slot = next((s for s in self.in_flight if s.index == node.slot), None)
        if slot is not None and slot.index == self.cycle and i in slot.rows:
            return 1  # ran stage 0 this cycle only
        if slot is None:  # already exited
            return self.n
        return self.cycle - slot.index + 1 if i in slot.down_rows else 1

    def _leave(self) -> Slot:
        """Slot `cycle` leaves stage 0: the rows still live travel on; the stages after stage 0
        apply this cycle's verdict just before it (see the module docstring)."""
        slot = self.in_flight[-1]
        slot.compaction = self.down.settle(self.nodes)
        slot.keep = [k for k, i in enumerate(slot.rows) if self.nodes[i].state is not State.DEAD]
        slot.down_rows = [slot.rows[k] for k in slot.keep]
        slot.layout = self.down.append(slot.down_rows, self.nodes)
        slot.successors = [self.successor(i) for i in slot.down_rows]
        return slot

    def alive(self, ids: list[int]) -> list[int]:
        """Indices into `ids` of the nodes that are not dead (stages still run rows that died after
        they were sent; their features are not worth keeping)."""
        return [k for k, i in enumerate(ids) if self.nodes[i].state is not State.DEAD]

    def live_children(self, i: int) -> list[int]:
        return [c for c in self.nodes[i].children if self.nodes[c].state is State.DRAFT]

    def ranked_children(self, i: int) -> list[int]:
        """Live children best first by the drafter's score, ties in the order they were drafted (a
        bf16 drafter's scores come in steps): the ranks a walk records and a replay steps into."""
        return sorted(self.live_children(i), key=lambda c: -self.nodes[c].score)

    def settled_nodes(self) -> list[int]:
        """The nodes that died since the last call (their features are no longer needed)."""
        out, self._died = self._died, []
        return out

    def leaves(self, now: bool = False) -> list[int]:
        """Live nodes without a live child, parents first; `now`: only those entered or entering
        this cycle (what a node entering now may hang below)."""
        out = [i for i in self.live() if not any(self.nodes[c].state is State.DRAFT for c in self.nodes[i].children)]
        return [i for i in out if i not in self.drafted] if now else out

    def successor(self, i: int):
        """The draft of node i's only live child when that child was sampled from a distribution
        (what the verifier's rejection rule needs), else None: the target then draws its own."""
        kids = [c for c in self.nodes[i].children if self.nodes[c].state is State.DRAFT]
        return self.nodes[kids[0]].draft if len(kids) == 1 else None
