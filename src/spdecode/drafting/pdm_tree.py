"""The Pipeline Draft Module drafting over SPD's live draft tree: SPD's drafter at any number of
stages and tree budget, and eagle's (an EAGLE-style head is the PDM with one stage).

What the PDM sees, per cycle (the same view its training lays out, training/layout.py):
- tokens that left the pipeline verified: the deepest row, from all their anchors; these rows
  stay in the PDM's position-indexed cache;
- every live node in flight at its current depth d (it passed d stages): the row of type f(d),
  from the anchors the stages produced for it; nodes entering now (or waiting to) at depth 0,
  embedding-only; each sees the verified prefix and its own ancestors only (a tree mask);
- nodes grown this cycle: embedding-only rows (an "embed" head or SPD's PDM), or with a
  "feedback" head the embedding fused with the head's output at the node's parent.
In-flight rows are transient (their depth changes every cycle): each cycle truncates the cache
to the verified prefix and runs them again.

Growth (tree_build.py): from the best live leaves, EAGLE-2's best-first levels under the shape's
budget. With budget 1 (SPD as published) the newest leaf gets one child, drawn from the PDM's
distribution when sampling (its q travels to the verifier's rejection rule).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..runtime.cache_layout import CacheView
from ..runtime.errors import SpdError
from ..runtime.tree import chunk_tensors
from ..runtime.verify import propose
from .pdm import PipelineDraftModule
from .tree_build import Grown, grow_below, newest_leaf, tree_starts

GROWN = 1 << 40  # ids of nodes grown this cycle, before they join the schedule


class PdmTreeDrafter:
    """A trained PDM as the engine core's drafter (`protocols.SlotDrafter`)."""

    after_stage0 = False

    def __init__(self, pdm: PipelineDraftModule):
        self.pdm, self.anchors, self.vocab = pdm, list(pdm.cfg.anchors), pdm.vocab
        self.method = "eagle" if pdm.cfg.chain else "spd"
        self.target = pdm.target[0]
        self.completed = 0
        self.passes = self.pass_rows = 0  # PDM passes run and their rows (what `plan --measure` times a pass by)

    def reset(self, run) -> None:
        if self.pdm.cfg.n_stages != run.n:
            raise SpdError(f"this draft was trained for {self.pdm.cfg.n_stages} stages, the pipeline has {run.n}")
        self.completed = 0
        cache = self.pdm.cache
        cache.reset()
        # The cache holds rows, not only positions: in-flight and grown rows sit after the prefix.
        cache.max_positions = max(cache.max_positions, self.target.context_length + 4096)
        cache.ensure_capacity(max(256, 2 * run.prompt_len))
        self.sampler = run.sampler

    # -- the PDM's view of this cycle ------------------------------------------------------------
    def _embed(self, tokens: list[int]) -> torch.Tensor:
        return self.target.embed(torch.tensor([tokens], dtype=torch.long, device=self.target.device))[0]

    def _row_features(self, run, ids: list[int]) -> torch.Tensor:
        """Rows [len(ids), H] of in-flight nodes at their depths (depth 0: embedding-only)."""
        pdm, sched = self.pdm, run.sched
        rows = [None] * len(ids)
        by_type: dict[int, list[int]] = {}
        for k, i in enumerate(ids):
            by_type.setdefault(pdm.type_of_depth[sched.depth(i)], []).append(k)
        for t, ks in by_type.items():
            if t == 0:
                feats = [self._embed([sched.nodes[ids[k]].token for k in ks])]
            else:
                feats = run.store.node_rows(t + 1, [ids[k] for k in ks])
            out = pdm.project(t, feats)
            for k, r in zip(ks, out, strict=True):
                rows[k] = r
        return torch.stack(rows)

    def _in_flight(self, run, ids: list[int]) -> torch.Tensor:
        """Run the newly verified rows and the in-flight ones; returns the in-flight rows' outputs."""
        pdm, sched = self.pdm, run.sched
        end = sched.nodes[sched.root].position  # every position before the root has left the pipeline
        pdm.cache.truncate(self.completed)
        lo, done = self.completed, end - self.completed
        parts = []
        if done > 0:
            parts.append(pdm.project(pdm.cfg.n_types - 1, run.store.rows(pdm.cfg.n_types, lo, end)))
        parts.append(self._row_features(run, ids))
        rows = torch.cat(parts)
        # Verified rows see the verified rows before them; in-flight rows all of those and their ancestors.
        tree = CacheView(end).append(ids, sched.nodes)
        q = rows.shape[0]
        visible = torch.zeros(q, q, dtype=torch.bool, device=rows.device)
        visible[:done, :done] = torch.ones(done, done, dtype=torch.bool).tril()
        visible[done:, :done] = True
        _, tree_visible = chunk_tensors(tree, rows.device)
        visible[done:, done:] = tree_visible
        positions = torch.tensor(list(range(lo, end)) + list(tree.positions), device=rows.device)
        out = pdm.run(rows[None], lo, positions, visible, committed=lo)[0]
        self.passes, self.pass_rows = self.passes + 1, self.pass_rows + q
        self.completed = end
        return out[done:]


    # -- growth ----------------------------------------------------------------------------------
    def grow(self, run, now: bool) -> None:
        sched = run.sched
        ids = [i for i in sched.live() if not now or i not in sched.drafted]
        if not run.shape.tree:  # SPD as published: the newest leaf's one child
            leaf = newest_leaf(run, now)
            if leaf is None:
                return
            outs = dict(zip(ids, self._in_flight(run, ids), strict=True))
            d = propose(self.pdm.head(outs[leaf][None])[0], self.sampler, self.vocab, self.target.config.vocab_size)
            run.sched.add(d.token, leaf, draft=d if d.q is not None else None, now=now)
            return
        starts = tree_starts(run, ids)
        if not starts:
            return
        outs = dict(zip(ids, self._in_flight(run, ids), strict=True))
        growth = _Growth(self, run, ids, outs)

        def expand(grown, frontier):
            logprobs = torch.log_softmax(self.pdm.head(growth.outputs(grown, frontier)), dim=-1)
            for row, (kind, r) in enumerate(frontier):
                if kind == "leaf":
                    taken = self._draft_ids([sched.nodes[c].token for c in sched.live_children(r)])
                    if taken:
                        logprobs[row, taken] = float("-inf")
            return logprobs

        grow_below(run, starts, expand, self.vocab, now)

    @torch.no_grad()
    def tree_logits(self, run, tree) -> torch.Tensor:
        """Draft logits [1 + m, V] (the target's vocabulary, -inf outside the draft vocabulary) after
        the waiting root and after each node of `tree` hung below it, as growth computes them (for
        tests and diagnostics: the drafter's view of a given tree)."""
        sched = run.sched
        ids = [i for i in sched.live() if i not in sched.drafted]
        outs = dict(zip(ids, self._in_flight(run, ids), strict=True))
        growth = _Growth(self, run, ids, outs)
        grown = [Grown(None if p < 0 else p, sched.root, t, 0.0)
                 for t, p in zip(tree.tokens, tree.parents, strict=True)]
        for d in range(1, tree.max_depth + 1):  # level by level: a row may need its parent's output
            growth.outputs(grown, [("new", i) for i in range(len(tree)) if tree.depth(i) == d])
        h = growth.outputs(grown, [("leaf", sched.root)] + [("new", i) for i in range(len(tree))])
        logits = self.pdm.head(h)
        if self.vocab is None:
            return logits
        full = logits.new_full((logits.shape[0], self.target.config.vocab_size), float("-inf"))
        return full.index_copy_(1, self.vocab, logits)

    def _draft_ids(self, tokens: list[int]) -> list[int]:
        """Indices in the draft vocabulary of target `tokens` (those outside it are left out)."""
        if self.vocab is None:
            return tokens
        if not hasattr(self, "_index"):
            self._index = {int(t): i for i, t in enumerate(self.vocab.tolist())}
        return [self._index[t] for t in tokens if t in self._index]


class _Growth:
    """One cycle's growth in the PDM's cache: the in-flight rows ran (their outputs `outs`); grown
    nodes run on demand, each after its parent, at its position and seeing its ancestors only."""

    def __init__(self, drafter: PdmTreeDrafter, run, ids: list[int], outs: dict[int, torch.Tensor]):
        self.drafter, self.sched, self.outs = drafter, run.sched, outs
        self.view = CacheView(run.sched.nodes[run.sched.root].position)
        self.view.rows = list(ids)
        self.done: dict[int, torch.Tensor] = {}  # grown index -> output
        self.local: dict[int, SimpleNamespace] = {}  # GROWN + index -> (parent, position)

    def __getitem__(self, i):  # node id -> (parent, position), for CacheView
        return self.local[i] if i >= GROWN else self.sched.nodes[i]

    def outputs(self, grown, frontier) -> torch.Tensor:
        """The PDM's raw output at each frontier entry, running the grown ones not run yet."""
        pdm = self.drafter.pdm
        new = [r for kind, r in frontier if kind == "new" and r not in self.done]
        if new:
            for r in new:
                g = grown[r]
                parent = GROWN + g.parent if g.parent is not None else g.leaf
                self.local[GROWN + r] = SimpleNamespace(parent=parent, position=self[parent].position + 1)
            parents = torch.stack([self.done[grown[r].parent] if grown[r].parent is not None
                                   else self.outs[grown[r].leaf] for r in new])
            rows = pdm.drafted_rows(self.drafter._embed([grown[r].token for r in new]), parents)
            layout = self.view.append([GROWN + r for r in new], self)
            positions, visible = chunk_tensors(layout, rows.device)
            out = pdm.run(rows[None], layout.start, positions, visible, committed=layout.committed)[0]
            self.drafter.passes, self.drafter.pass_rows = self.drafter.passes + 1, self.drafter.pass_rows + len(new)
            self.done.update(zip(new, out, strict=True))
        return torch.stack([self.outs[r] if kind == "leaf" else self.done[r] for kind, r in frontier])
