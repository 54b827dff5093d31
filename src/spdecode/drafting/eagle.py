"""EAGLE-style drafting (Li et al., arXiv 2401.15077 / 2406.16858 / 2503.01840): the n = 1 PDM, a
small head on the target's own hidden states, grows a dynamic draft tree for one target pass.

What the head sees, per position (the same view its training lays out, training/layout.py):
- tokens the target has processed: the deepest row, from the target's anchors (the target pass
  that verified them captured those; `observe` hands them over);
- the root, the last verified token, which the target has not processed yet: an embedding-only
  row (type 0);
- drafted tree nodes: embedding-only rows too ("embed"), or with "feedback" the embedding fused
  with the head's own output at the node's parent.

Rows of processed tokens stay in the head's position-indexed cache; the root's and the nodes'
are transient: each step truncates to the processed prefix and runs the root, then the nodes
(at slots after the root, at their true positions, each seeing its ancestors only).
"""

from __future__ import annotations

import torch

from ..runtime.errors import SpdError
from ..runtime.tree import DraftTree, ancestor_mask
from .pdm import PipelineDraftModule
from .tree_build import best_first_tree


class EagleCandidates:
    """A trained EAGLE-style head drafting trees (`propose_tree`) from the target's features.

    `anchors`: the hidden-state indices a target pass must capture for `observe`."""

    def __init__(self, pdm: PipelineDraftModule):
        if not pdm.cfg.chain:
            raise SpdError("--method eagle needs an EAGLE-style head (a draft trained with `spdecode train "
                           f"--eagle embed|feedback`); this draft is an SPD PDM for {pdm.cfg.n_stages} stages")
        self.pdm = pdm
        self.anchors = list(pdm.cfg.anchors)
        self.target = pdm.target[0]
        self.reset()

    def reset(self) -> None:
        self.completed = 0  # positions whose deepest rows the head's cache holds
        self.waiting: list[list[torch.Tensor]] = []  # observed chunks (one [q, H] per anchor) not run yet
        self.pdm.cache.reset()

    def _next_position(self) -> int:
        return self.completed + sum(chunk[0].shape[0] for chunk in self.waiting)

    def observe(self, start: int, anchors: dict[int, torch.Tensor]) -> None:
        """The target processed positions start..start+q-1: its hidden states h_j [q, H] there."""
        if start != self._next_position():
            raise ValueError(f"features for position {start} arrive, but {self._next_position()} is the next one")
        H = self.target.config.hidden_size
        self.waiting.append([anchors[j].reshape(-1, H) for j in self.anchors])

    # -- one drafting step ---------------------------------------------------------------------
    def _enter(self, tokens: list[int]) -> None:
        """Run the newly processed rows and the root (position len(tokens)-1) through the head."""
        pdm, root = self.pdm, len(tokens) - 1
        if self._next_position() != root:
            raise ValueError(f"the head holds features up to position {self._next_position()}, "
                             f"but the root sits at {root}")
        pdm.cache.ensure_capacity(root + 2)
        rows = []
        if self.waiting:
            feats = [torch.cat([chunk[i] for chunk in self.waiting]) for i in range(len(self.anchors))]
            rows.append(pdm.project(pdm.cfg.n_types - 1, feats))
        rows.append(pdm.project(0, [self.target.embed(torch.tensor([tokens[-1]], device=self.target.device))]))
        pdm.cache.truncate(self.completed)
        out = pdm.run(torch.cat(rows)[None], self.completed)
        self.completed, self.waiting = root, []
        self.root, self.root_out = root, out[0, -1]
        self.rows: list[torch.Tensor] = []  # per node of the tree grown this step: its row
        self.outs: list[torch.Tensor] = []  # and the head's raw output there

    def _run_nodes(self, tree: DraftTree) -> None:
        """Outputs for every node of `tree` (grown from this step's earlier trees by appending)."""
        pdm = self.pdm
        while len(self.outs) < len(tree):
            lo = len(self.rows)
            hi = lo
            while hi < len(tree) and tree.parents[hi] < len(self.outs):  # rows need the parent's output
                hi += 1
            if hi == lo:
                raise ValueError("a node's parent comes after it")
            ids = torch.tensor(tree.tokens[lo:hi], device=self.target.device)
            parents = torch.stack([self.root_out if p < 0 else self.outs[p] for p in tree.parents[lo:hi]])
            self.rows.extend(pdm.drafted_rows(self.target.embed(ids), parents))
            sub = DraftTree(tree.tokens[:hi], tree.parents[:hi])
            positions = torch.tensor(sub.positions(self.root)[1:], device=self.target.device)
            visible = ancestor_mask(sub, self.target.device)[1:, 1:]
            # Nodes sit in slots past the root but at positions within the context: a tree grown
            # before pruning (up to depth * topk^2 nodes) may need slots past it, so the guard widens.
            pdm.cache.max_positions = max(pdm.cache.max_positions, self.root + 2 + hi)
            pdm.cache.ensure_capacity(self.root + 2 + hi)
            pdm.cache.truncate(self.root + 1)
            out = pdm.run(torch.stack(self.rows)[None], self.root + 1, positions, visible)
            self.outs = list(out[0])

    def tree_logits(self, tokens: list[int], tree: DraftTree) -> torch.Tensor:
        """Draft logits [1 + m, V] (the target's vocabulary; -inf outside the draft vocabulary)
        after the root tokens[-1] and after each node of `tree`."""
        self._enter(tokens)
        self._run_nodes(tree)
        return self._full_vocab(self.pdm.head(torch.stack([self.root_out, *self.outs])))

    def _full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if self.pdm.vocab is None:
            return logits
        full = logits.new_full((logits.shape[0], self.target.config.vocab_size), float("-inf"))
        return full.index_copy_(1, self.pdm.vocab, logits)

    @torch.inference_mode()
    def propose_tree(self, tokens: list[int], budget: int, depth: int, topk: int = 8) -> DraftTree | None:
        """A dynamic tree (EAGLE-2's best-first growth) from the head's distributions."""
        self._enter(tokens)

        def expand(tree: DraftTree, frontier: list[int]) -> torch.Tensor:
            self._run_nodes(tree)
            h = torch.stack([self.root_out if i < 0 else self.outs[i] for i in frontier])
            return torch.log_softmax(self.pdm.head(h), dim=-1)  # over the draft vocabulary

        return best_first_tree(expand, budget, depth, topk, self.pdm.vocab)
