"""What SPD's drafters read, and the drafters of the pipeline that need no trained weights.

Every drafter of the engine core is a `protocols.SlotDrafter`: it grows the live draft tree of a
generation (`methods.schedule.TreeSchedule`) from what exists before the cycle: tokens, and the
target's hidden states (anchors) of every depth, which the executor keeps in an AnchorStore.
The trained one is the PDM (pdm_tree.py, also eagle's head); here: the store, SPEED's early
exit, and the adapter that lets a token-level tree drafter (prompt lookup, a draft model) grow
a tree below the waiting root.
"""

from __future__ import annotations

import torch

from ..runtime.errors import SpdError
from ..runtime.tree import DraftTree
from ..runtime.verify import propose


class AnchorStore:
    """The target's hidden states h_j at the drafter's anchors j.

    Tokens that left the pipeline (the prompt, verified tokens) are kept by position, in buffers
    [capacity, H] (rollback needs nothing: a position is overwritten when it is decided again).
    Nodes still in flight are kept by node id, one row per anchor the stages have produced so far,
    until they leave the pipeline verified (`commit`: to their position) or die (`forget`)."""

    def __init__(self, anchors: list[int], hidden: int, dtype, device, capacity: int = 256):
        self.anchors = list(anchors)
        self.slot = {j: i for i, j in enumerate(anchors)}
        self.buf = [torch.zeros(capacity, hidden, dtype=dtype, device=device) for _ in anchors]
        self.nodes: dict[int, dict[int, torch.Tensor]] = {}

    def put(self, j: int, start: int, h: torch.Tensor) -> None:
        """Store h_j [q, H] of the tokens at positions start..start+q-1."""
        self._fit(start + h.shape[0])
        self.buf[self.slot[j]][start : start + h.shape[0]] = h

    def _fit(self, n: int) -> None:
        """Room for positions < n: the buffers double (a request reserves only its first positions)."""
        have = self.buf[0].shape[0]
        if n > have:
            grown = max(n, 2 * have)
            self.buf = [torch.cat([b, b.new_zeros(grown - have, b.shape[1])]) for b in self.buf]

    def put_nodes(self, j: int, ids: list[int], h: torch.Tensor) -> None:
        """Store h_j [q, H] of in-flight nodes `ids` (one row each)."""
        if j not in self.slot:
            return
        for k, i in enumerate(ids):
            self.nodes.setdefault(i, {})[j] = h[k]

    def rows(self, count: int, lo: int, hi: int) -> list[torch.Tensor]:
        """The first `count` anchors of positions lo..hi-1, each [hi-lo, H]."""
        return [b[lo:hi] for b in self.buf[:count]]

    def node_rows(self, count: int, ids: list[int]) -> list[torch.Tensor]:
        """The first `count` anchors of in-flight nodes `ids`, each [len(ids), H]."""
        return [torch.stack([self.nodes[i][j] for i in ids]) for j in self.anchors[:count]]

    def has(self, i: int, j: int) -> bool:
        return j in self.nodes.get(i, {})

    def commit(self, i: int, position: int) -> None:
        """Node i left the pipeline verified: its anchors become position `position`'s."""
        self._fit(position + 1)
        for j, h in self.nodes.pop(i, {}).items():
            self.buf[self.slot[j]][position] = h

    def forget(self, ids) -> None:
        for i in ids:
            self.nodes.pop(i, None)


def leaf_to_extend(run, now: bool = False) -> int | None:
    """The live leaf a one-node-per-slot drafter extends: the newest (the chain's end)."""
    leaves = run.sched.leaves(now)
    return leaves[-1] if leaves else None


class SpeedDrafter:
    """SPEED (Hooper et al., arXiv 2310.12072) as a drafter of the SPD pipeline: the next token is
    predicted from the newest in-flight token's hidden state at an early depth d, through the
    target's own final norm and LM head (an early exit, no trained parameters), and enters the
    layer stack while that token is still in flight; a wrong guess flushes like a branch mispredict.

    The newest token reaches depth d only inside stage 0's work of this cycle, so this drafter runs
    after stage 0 (`after_stage0`), not concurrently with it as the PDM does: d must lie in stage 0.
    One token per slot (SPEED's pipeline carries no trees)."""

    method = "speed"
    after_stage0 = True
    vocab = None

    def __init__(self, target, depth: int):
        first = target.stage_sizes[0]
        if not 1 <= depth <= first:
            raise SpdError(f"SPEED reads the newest token at depth d, which stage 0 computes within a cycle: "
                           f"d must be in 1..{first} (stage 0's layers; got {depth})")
        self.target, self.anchors = target, [depth]

    def reset(self, run) -> None:
        if run.shape.tree:
            raise SpdError("SPEED drafts one token per slot: it takes no tree budget")
        self.sampler = run.sampler

    def grow(self, run, now: bool) -> None:
        leaf = leaf_to_extend(run, now)
        j = self.anchors[0]
        if leaf is None or not run.store.has(leaf, j):
            return
        logits = self.target.logits(run.store.nodes[leaf][j][None, None])[0, -1]
        d = propose(logits, self.sampler, None, self.target.config.vocab_size)
        run.sched.add(d.token, leaf, draft=d if d.q is not None else None)


class TokenTreeDrafter:
    """A token-level tree drafter (`protocols.TreeDrafter`: prompt lookup's trie, a draft model's
    or an early exit's dynamic tree) in the engine core: it grows the waiting root's subtree into
    the root's own slot, from the tokens alone. That is speculative decoding over a draft tree,
    the core's n = 1 case (no pipeline to draft ahead for)."""

    after_stage0 = False
    anchors: list[int] = []

    def __init__(self, inner, method: str = "sd-tree"):
        self.inner, self.method = inner, method

    def reset(self, run) -> None:
        if run.n != 1:
            raise SpdError(f"{self.method} drafts a tree below the last verified token: it runs with one stage")
        self.inner.reset()

    def grow(self, run, now: bool) -> None:
        if not now:
            return
        shape, root = run.shape, run.sched.root
        tree = self.inner.propose_tree(run.tokens_to(root), shape.budget, shape.depth, shape.topk)
        add_tree(run.sched, root, tree or DraftTree((), ()), now=True)


def add_tree(sched, parent: int, tree: DraftTree, now: bool) -> list[int]:
    """Hang `tree`'s nodes below node `parent` of the schedule; returns their ids."""
    ids: list[int] = []
    for token, p in zip(tree.tokens, tree.parents, strict=True):
        ids.append(sched.add(token, parent if p < 0 else ids[p], now=now))
    return ids
