"""Drafters for the SPD pipeline, one class per method, each a `protocols.SpdDrafter`: it proposes
logits for position ctx.draft_position from what exists before this cycle (tokens, and the
anchors of every depth, which the executor keeps in an AnchorStore)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pdm import PipelineDraftModule


class AnchorStore:
    """Per-anchor buffers [capacity, H] indexed by position: rollback needs nothing (overwrite)."""

    def __init__(self, anchors: list[int], hidden: int, dtype, device, capacity: int = 256):
        self.anchors = list(anchors)
        self.slot = {j: i for i, j in enumerate(anchors)}
        self.buf = [torch.zeros(capacity, hidden, dtype=dtype, device=device) for _ in anchors]

    def put(self, j: int, start: int, h: torch.Tensor) -> None:
        """Store h_j [q, H] of the tokens at positions start..start+q-1."""
        self.buf[self.slot[j]][start : start + h.shape[0]] = h

    def rows(self, count: int, lo: int, hi: int) -> list[torch.Tensor]:
        """The first `count` anchors of positions lo..hi-1, each [hi-lo, H]."""
        return [b[lo:hi] for b in self.buf[:count]]


@dataclass
class DraftContext:
    tokens: list[int]  # ids at positions 0..draft_position-1: prompt, verified tokens, in-flight drafts
    start: int  # oldest in-flight position; every position before it has all its anchors
    store: AnchorStore | None

    @property
    def draft_position(self) -> int:
        return len(self.tokens)


class PDMDrafter:
    """SPD's trained drafter: the Pipeline Draft Module over anchors of every depth."""

    method = "spd"
    after_stage0 = False

    def __init__(self, pdm: PipelineDraftModule):
        self.pdm = pdm
        self.anchors = pdm.cfg.anchors
        self.vocab = pdm.vocab
        self.completed = 0  # rows of completed tokens held in the PDM's cache

    def reset(self, prompt_len: int) -> None:
        self.completed = 0
        self.pdm.cache.reset()
        self.pdm.cache.ensure_capacity(min(self.pdm.cache.max_positions, max(256, 2 * prompt_len)))

    def propose(self, ctx: DraftContext) -> torch.Tensor:
        pdm, store, m = self.pdm, ctx.store, self.pdm.cfg.n_types
        rows = []
        if self.completed < ctx.start:  # tokens that left the pipeline since last time: deepest type
            rows.append(pdm.project(m - 1, store.rows(m, self.completed, ctx.start)))
        for p in range(ctx.start, ctx.draft_position):
            t = pdm.type_of_depth[ctx.draft_position - 1 - p]
            rows.append(pdm.project(t, store.rows(t + 1, p, p + 1)))
        # Rows of in-flight tokens are transient (their type deepens every cycle): drop the
        # previous cycle's, keep the completed ones.
        pdm.cache.truncate(self.completed)
        out = pdm.run(torch.cat(rows)[None], self.completed)
        self.completed = ctx.start
        return pdm.head(out[:, -1])[0]


class SpeedDrafter:
    """SPEED (Hooper et al., arXiv 2310.12072) as a drafter of the SPD pipeline: the next token is
    predicted from the newest in-flight token's hidden state at an early depth d, through the
    target's own final norm and LM head (an early exit, no trained parameters), and enters the
    layer stack while that token is still in flight; a wrong guess flushes like a branch mispredict.

    The newest token reaches depth d only inside stage 0's work of this cycle, so this drafter runs
    after stage 0 (`after_stage0`), not concurrently with it as the PDM does: d must lie in stage 0.
    """

    method = "speed"
    after_stage0 = True
    vocab = None

    def __init__(self, target, depth: int):
        first = target.stage_sizes[0]
        if not 1 <= depth <= first:
            from ..runtime.errors import SpdError

            raise SpdError(f"SPEED reads the newest token at depth d, which stage 0 computes within a cycle: "
                           f"d must be in 1..{first} (stage 0's layers; got {depth})")
        self.target, self.anchors = target, [depth]

    def reset(self, prompt_len: int) -> None:
        pass

    def propose(self, ctx: DraftContext) -> torch.Tensor:
        h = ctx.store.rows(1, ctx.draft_position - 1, ctx.draft_position)[0]
        return self.target.logits(h[None])[0, -1]
