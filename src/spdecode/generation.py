"""The pieces every decoding method shares: prompt checks, the stop rule, and the result type."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .errors import SpdError
from .metrics import Metrics


@dataclass
class Generation:
    tokens: list[int]  # new tokens only, EOS included when the model emitted it (as HF generate)
    metrics: Metrics = field(default_factory=Metrics)


def check_prompt(prompt_ids: list[int], max_new_tokens: int, context_length: int) -> int:
    """Validate a prompt; return max_new_tokens clamped to what fits in the model's context."""
    if not prompt_ids:
        raise SpdError("the prompt is empty")
    if max_new_tokens < 1:
        raise SpdError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    room = context_length - len(prompt_ids)
    if room < 1:
        raise SpdError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {context_length} tokens"
        )
    if max_new_tokens > room:
        warnings.warn(f"max_new_tokens {max_new_tokens} clamped to {room} to fit the model's context",
                      stacklevel=3)
    return min(max_new_tokens, room)


def eos_ids(model, tokenizer) -> set[int]:
    """The ids HF generate stops on: the generation config's EOS, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id if tokenizer is not None else None
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


class StopRule:
    """Decides, token by token, whether generation is over (EOS or the token budget)."""

    def __init__(self, eos: set[int], max_new_tokens: int):
        self.eos, self.max_new_tokens = eos, max_new_tokens
        self.reason = ""

    def done(self, tokens: list[int]) -> bool:
        if tokens and tokens[-1] in self.eos:
            self.reason = "eos"
        elif len(tokens) >= self.max_new_tokens:
            self.reason = "length"
        return bool(self.reason)
