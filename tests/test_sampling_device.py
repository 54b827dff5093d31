"""Sampling draws where the logits are: every generator is made for the device of the tensor it
draws for (a CUDA draw with a CPU generator fails), and every q a drafter makes lives on the
target's device (verification subtracts it from the target's p there).

This machine has no GPU: `meta` stands in for a non-CPU device, and the random draws are
recorded (tensor's device, the device its generator was made for) instead of made.
"""

import pytest
import torch
from conftest import tiny_model

from spdecode.drafting.candidates import PromptLookupCandidates, one_hot
from spdecode.drafting.reference import ReferenceCandidates
from spdecode.runtime.sampling import Sampler, SamplingParams
from spdecode.runtime.verify import Draft, verify

META = torch.device("meta")
SAMPLING = SamplingParams(temperature=0.8, top_k=20, top_p=0.95, seed=3)
TOKENS = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]


class Drawn(Exception):
    """A recorded draw stops the caller (a meta tensor has no values to go on with)."""


@pytest.fixture
def draws(monkeypatch):
    class Recording(torch.Generator):
        """A CPU generator that remembers the device it was asked for."""

        def __new__(cls, device="cpu"):
            g = super().__new__(cls, "cpu")
            g.asked = torch.device(device)
            return g

        def __init__(self, device="cpu"):
            pass

    def device_of(g):
        return getattr(g, "asked", None if g is None else g.device)

    log = []

    def rand(*size, generator=None, device=None, **kw):
        log.append((torch.device(device or "cpu"), device_of(generator)))
        raise Drawn

    def multinomial(probs, num_samples, replacement=False, *, generator=None):
        log.append((probs.device, device_of(generator)))
        raise Drawn

    monkeypatch.setattr(torch, "Generator", Recording)
    monkeypatch.setattr(torch, "rand", rand)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    return log


def test_cuda_sampling_sampler_draws_with_a_generator_on_the_logits_device(draws):
    sampler = Sampler(SAMPLING)  # made with no device, as a PipeSpec or distributed stage makes it
    with pytest.raises(Drawn):
        sampler.choose(torch.zeros(97, device=META))
    assert draws == [(META, META)]


def test_cuda_sampling_verify_draws_on_the_target_logits_device(draws):
    sampler = Sampler(SAMPLING, "cpu")  # told the CPU; the target's logits are elsewhere
    q = torch.full((97,), 1 / 97, device=META)
    with pytest.raises(Drawn):
        verify(torch.zeros(97, device=META), Draft(5, q), sampler)
    assert draws == [(META, META)]


def test_cuda_sampling_one_hot_q_is_made_on_the_target_device():
    assert one_hot(4, 97, META).device == META
    sampler = Sampler(SAMPLING)
    reference = ReferenceCandidates(97, 1.0, device=META)
    reference.set_reference(TOKENS, [7, 8, 1])
    for drafter in (PromptLookupCandidates(97, device=META), reference):
        drafts = drafter.propose(TOKENS, 3, sampler)
        assert [d.token for d in drafts] == [7, 8, 1]
        assert all(d.q.device == META for d in drafts), type(drafter).__name__


def test_cuda_sampling_prompt_lookup_from_the_cli_knows_the_target_device():
    from spdecode.drafting.build import make_candidates

    model = tiny_model("llama").to("meta")
    drafts = make_candidates("prompt-lookup", model).propose(TOKENS, 3, Sampler(SAMPLING))
    assert drafts and all(d.q.device == META for d in drafts)


def test_cuda_sampling_pipespec_stage_compares_the_upstream_q_on_its_own_device(monkeypatch):
    """The upstream's q comes through shared CPU memory; the stage's logits may be on a GPU."""
    import spdecode.methods.pipespec_stage as ps

    seen = []

    def record(logits, draft, sampler):
        seen.append((logits.device, draft.q.device))
        return False, draft.token

    monkeypatch.setattr(ps, "verify", record)
    qs = torch.full((2, 97), 1 / 97)  # as read from SharedChain.probs
    ps.Stage(1, 2, 3).check(torch.zeros(3, 97, device=META), [4, 5], qs, Sampler(SAMPLING))
    assert seen == [(META, META)]


def test_a_seeded_sampler_draws_the_same_whatever_device_it_was_told():
    logits = torch.randn(97, generator=torch.Generator().manual_seed(0))
    a, b = Sampler(SAMPLING), Sampler(SAMPLING, "cpu")
    runs = [[s.choose(logits) for _ in range(20)] for s in (a, b)]
    assert runs[0] == runs[1]
