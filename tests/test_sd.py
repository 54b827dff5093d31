"""Classic speculative decoding through the shared verifier: greedy equals AR, sampling follows AR."""

import pytest
from conftest import tiny_model
from distribution import sampled_vs_exact

from spdecode.drafting.candidates import ModelCandidates, PromptLookupCandidates, early_exit_candidates
from spdecode.methods.ar import generate_ar
from spdecode.methods.sd import generate_sd
from spdecode.runtime.errors import SpdError
from spdecode.runtime.staged import StagedTarget
from spdecode.runtime.verify import Draft

PROMPT = [5, 17, 42, 8, 33, 71, 9, 5, 17, 42]


class ScriptedCandidates:
    """Proposes the reference continuation (right) or the reference + 1 (wrong)."""

    def __init__(self, prompt, reference, right: bool):
        self.expected, self.right = list(prompt) + list(reference), right

    def propose(self, tokens, gamma, sampler):
        n = len(tokens)
        ref = self.expected[n : n + gamma]
        return [Draft(t if self.right else (t + 1) % 97, None) for t in ref]

    def reset(self):
        pass


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request):
    model = tiny_model(request.param)
    return model, generate_ar(StagedTarget(model), PROMPT, 40).tokens


@pytest.mark.parametrize("kind", ["oracle", "wrong", "prompt-lookup", "early-exit", "model"])
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_equals_ar(tiny, kind, gamma):
    model, ref = tiny
    drafter = {
        "oracle": lambda: ScriptedCandidates(PROMPT, ref, True),
        "wrong": lambda: ScriptedCandidates(PROMPT, ref, False),
        "prompt-lookup": lambda: PromptLookupCandidates(97),
        "early-exit": lambda: early_exit_candidates(model, 3),
        "model": lambda: ModelCandidates(tiny_model("llama", seed=1, num_hidden_layers=2)),
    }[kind]()
    gen = generate_sd(StagedTarget(model), drafter, PROMPT, 40, gamma=gamma)
    assert gen.tokens == ref
    m = gen.metrics
    assert m.new_tokens == len(ref) and m.drafts_accepted <= m.drafts_verified <= m.drafts_proposed
    if kind == "oracle":  # every target pass yields gamma + 1 tokens (until the budget runs out)
        assert m.alpha == 1.0 and m.cycles == -(-(len(ref) - 1) // (gamma + 1))
    if kind == "wrong":
        assert m.alpha == 0.0 and m.cycles == len(ref) - 1


def test_adaptive_gamma_is_lossless(tiny):
    model, ref = tiny
    gen = generate_sd(StagedTarget(model), early_exit_candidates(model, 4), PROMPT, 40, gamma=2, adaptive=True)
    assert gen.tokens == ref


def test_prompt_lookup_copies_the_latest_match_and_stops_at_eos(tiny):
    pl = PromptLookupCandidates(97)
    from spdecode.runtime.sampling import Sampler, SamplingParams

    drafts = pl.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3, Sampler(SamplingParams()))
    assert [d.token for d in drafts] == [7, 8, 1]
    model, ref = tiny
    eos = ref[12]
    gen = generate_sd(StagedTarget(model), PromptLookupCandidates(97), PROMPT, 40, eos={eos})
    assert gen.tokens == ref[: ref.index(eos) + 1] and gen.metrics.stop_reason == "eos"


def test_early_exit_needs_a_proper_prefix():
    with pytest.raises(SpdError):
        early_exit_candidates(tiny_model("llama"), 6)


@pytest.mark.parametrize("kind", ["early-exit", "prompt-lookup"])
def test_sampling_matches_ar_distribution(kind):
    model = tiny_model("llama", num_hidden_layers=3)
    target = StagedTarget(model)
    prompt = [5, 6, 7, 5, 6]
    drafter = early_exit_candidates(model, 1) if kind == "early-exit" else PromptLookupCandidates(97)
    tv, noise = sampled_vs_exact(model, prompt, 3, 3000,
                                 lambda params: generate_sd(target, drafter, prompt, 3, params, gamma=2).tokens)
    assert tv < 1.6 * noise, (tv, noise)
