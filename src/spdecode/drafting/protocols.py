"""The two drafter interfaces, in the spirit of HF's candidate generators. One class per method
implements one of them; executors rely on nothing else.

- `SpdDrafter`: drafts for SPD's pipeline (drafters.py: the PDM, SPEED's early exit). It proposes
  the token after the newest in-flight one, from the anchors of every depth, once per cycle.
- `CandidateGenerator`: drafts a block for classic speculative decoding and PipeSpec's first stage
  (candidates.py: prompt lookup, a draft model, an early exit; reference.py for tests).
- `TreeDrafter`: drafts a tree for one target pass (prompt lookup's trie, a draft model's or the
  EAGLE-style head's dynamic tree); a `FeatureDrafter` (eagle.py) also reads the target's hidden
  states of the tokens it processed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ..runtime.sampling import Sampler
    from ..runtime.tree import DraftTree
    from ..runtime.verify import Draft
    from .drafters import DraftContext


class SpdDrafter(Protocol):
    method: str  # the name a generation's metrics carry ("spd", "speed")
    after_stage0: bool  # needs the newest token's state from stage 0 of the same cycle (SPEED)
    anchors: list[int]  # hidden-state indices the executor must keep for it ([] = none)
    vocab: torch.Tensor | None  # draft-vocabulary ids -> target ids (None: the target's vocabulary)

    def reset(self, prompt_len: int) -> None:
        """A generation starts; the prompt's anchors are in the store."""

    def propose(self, ctx: DraftContext) -> torch.Tensor:
        """Logits over the drafter's vocabulary for position ctx.draft_position."""


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


class FeatureDrafter(TreeDrafter, Protocol):
    anchors: list[int]  # hidden-state indices (0: the embedding) the target's passes must capture

    def observe(self, start: int, anchors: dict[int, torch.Tensor]) -> None:
        """The target processed positions start..start+q-1; h_j [q, H] of each anchor j there."""
