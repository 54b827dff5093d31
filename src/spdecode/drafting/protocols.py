"""The two drafter interfaces, in the spirit of HF's candidate generators. One class per method
implements one of them; executors rely on nothing else.

- `SlotDrafter`: grows the live draft tree of SPD's engine core (methods/spd_core.py) once per
  cycle, from the anchors of every depth: the PDM (pdm_tree.py; eagle's head is the PDM with one
  stage), SPEED's early exit, and any `TreeDrafter` below the waiting root (drafters.py).
- `CandidateGenerator`: drafts a block for classic speculative decoding and PipeSpec's first stage
  (candidates.py: prompt lookup, a draft model, an early exit; reference.py for tests).
- `TreeDrafter`: drafts a tree for one target pass from the tokens alone (prompt lookup's trie, a
  draft model's dynamic tree).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..runtime.sampling import Sampler
    from ..runtime.tree import DraftTree
    from ..runtime.verify import Draft


class SlotDrafter(Protocol):
    method: str  # the name a generation's metrics carry ("spd", "eagle", "speed", "sd-tree")
    after_stage0: bool  # drafts from the newest node's state after stage 0 of the same cycle (SPEED)
    anchors: list[int]  # hidden-state indices the executor must keep for it ([] = none)

    def reset(self, run) -> None:
        """A generation (methods.spd_core.SpdRun) starts; the prompt's anchors are in run.store."""

    def grow(self, run, now: bool) -> None:
        """Add draft nodes to run.sched (TreeSchedule.add) as run.shape allows: below the waiting
        root into this cycle's slot (`now`), or below live leaves for the next slot."""


class CandidateGenerator(Protocol):
    def reset(self) -> None:
        """A generation starts: forget what the previous one cached."""

    def propose(self, tokens: list[int], gamma: int, sampler: Sampler) -> list[Draft]:
        """Up to gamma drafted tokens after `tokens`, each with the distribution it was drawn from
        (None when greedy; a deterministic drafter gives a one-hot q, which keeps sampling exact)."""


class TreeDrafter(Protocol):
    def reset(self) -> None:
        """A generation starts."""

    def propose_tree(self, tokens: list[int], budget: int, depth: int, topk: int) -> DraftTree | None:
        """At most `budget` candidate nodes, `depth` deep, rooted at tokens[-1] (None: no guess)."""
