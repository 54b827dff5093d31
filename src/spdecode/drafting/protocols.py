"""The two drafter interfaces, in the spirit of HF's candidate generators. One class per method
implements one of them; executors rely on nothing else.

- `SpdDrafter`: drafts for SPD's pipeline (drafters.py: the PDM, SPEED's early exit). It proposes
  the token after the newest in-flight one, from the anchors of every depth, once per cycle.
- `CandidateGenerator`: drafts a block for classic speculative decoding and PipeSpec's first stage
  (candidates.py: prompt lookup, a draft model, an early exit; reference.py for tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ..runtime.sampling import Sampler
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
