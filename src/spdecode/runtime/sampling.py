"""Sampling parameters and the logits -> probabilities warp shared by every decoder.

The warpers are transformers' own (temperature, then top-k, then top-p, HF's order), so a
sampled spdecode run follows the same distribution as HF `generate` with the same settings, and
speculative methods warp target and draft logits identically (required for lossless sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .errors import SpdError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise SpdError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise SpdError(f"top-k must be >= 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise SpdError(f"top-p must be in (0, 1] (got {self.top_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def warpers(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if not self.greedy and self.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            procs.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            procs.append(TopPLogitsWarper(self.top_p))
        return procs


class Sampler:
    """Turns logits into a token (greedy) or into warped probabilities and a seeded draw.

    Every random draw uses a generator on the device of the tensor it draws for (a CUDA draw
    needs a CUDA generator), made on first use there and seeded with the sampler's one seed; so
    a sampler works wherever its logits live, whatever device it was created for.
    """

    def __init__(self, params: SamplingParams, device=None):
        """`device`: where the draws will happen, if known (its generator is made at once)."""
        self.params = params
        self._warpers = params.warpers()
        # One seed for the whole run (a missing one: drawn now), whichever devices draw with it.
        self.seed = None if params.greedy else (params.seed if params.seed is not None else torch.seed())
        self._generators: dict[torch.device, torch.Generator] = {}
        if device is not None and not params.greedy:
            self.generator_for(device)

    def generator_for(self, device) -> torch.Generator | None:
        """The seeded generator for draws on `device` (None when greedy: nothing is drawn)."""
        if self.params.greedy:
            return None
        device = torch.device(device)
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            g.manual_seed(self.seed)
        return g

    def uniform(self, device) -> float:
        """One U(0, 1) draw, made on `device` (the device of the tensors it is compared with)."""
        return float(torch.rand((), generator=self.generator_for(device), device=device))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distribution over the vocabulary, for logits [..., V] (fp32)."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        # Each warper called directly: LogitsProcessorList.__call__ inspects every processor's
        # signature on every call (5 % of a sampled tiny-model run); these take (ids, scores) only.
        for warper in self._warpers:
            flat = warper(None, flat)
        return torch.softmax(flat, dim=-1).reshape(logits.shape)

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.reshape(-1), 1, generator=self.generator_for(probs.device)))

    def choose(self, logits: torch.Tensor) -> int:
        """Next token from one position's logits [V]."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        return self.draw(self.probs(logits))


GREEDY = SamplingParams()
