"""Autoregressive decoding on the staged target against HF generate (the oracle for everything else)."""

import pytest
import torch
from conftest import tiny_model

from spdecode.methods.ar import generate_ar
from spdecode.runtime.errors import SpdError
from spdecode.runtime.sampling import Sampler, SamplingParams
from spdecode.runtime.staged import StagedTarget


def hf_greedy(model, ids, n, eos=None):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("stages", [1, 4])
def test_greedy_equals_hf_generate(family, stages):
    model = tiny_model(family)
    ids = [5, 17, 42, 8, 33, 71, 9]
    ours = generate_ar(StagedTarget(model, stages), ids, 40).tokens
    assert ours == hf_greedy(model, ids, 40)


def test_stops_at_eos_and_includes_it():
    model = tiny_model("llama")
    ids = [5, 17, 42]
    free = generate_ar(StagedTarget(model), ids, 30).tokens
    eos = free[7]
    gen = generate_ar(StagedTarget(model), ids, 30, eos={eos})
    assert gen.tokens == free[: free.index(eos) + 1]
    assert gen.metrics.stop_reason == "eos"
    assert gen.tokens == hf_greedy(model, ids, 30, eos=eos)


def test_ar_cycles_are_counted_target_passes():
    """A cycle is one target pass after the prefill: counted from the passes the target really ran
    (not from tokens_per_cycle, which is defined from the same counters)."""
    target = StagedTarget(tiny_model("llama"))
    passes, forward = [], target.forward
    target.forward = lambda ids, start, *a, **k: passes.append((ids.shape[1], start)) or forward(ids, start, *a, **k)
    gen = generate_ar(target, [5, 6, 7], 12)
    m = gen.metrics
    # One prefill of the 3 prompt tokens, then one pass per further token, each at the next position.
    assert passes == [(3, 0)] + [(1, 3 + i) for i in range(11)]
    assert m.new_tokens == len(gen.tokens) == 12 and m.cycles == len(passes) - 1
    assert m.stop_reason == "length" and m.prompt_tokens == 3


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model("llama")
    target = StagedTarget(model)
    params = SamplingParams(temperature=1.0, top_k=3, seed=123)
    a = generate_ar(target, [5, 6, 7], 20, params).tokens
    b = generate_ar(target, [5, 6, 7], 20, params).tokens
    c = generate_ar(target, [5, 6, 7], 20, SamplingParams(temperature=1.0, top_k=3, seed=124)).tokens
    assert a == b and a != c
    # Every sampled token is among the 3 most likely under the target given the prefix.
    ctx = [5, 6, 7]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + a])).logits[0, len(ctx) - 1:-1]
    for row, tok in zip(logits, a, strict=True):
        assert tok in row.topk(3).indices.tolist()


def test_warped_probs_match_hand_computation():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = Sampler(SamplingParams(temperature=0.5, top_k=4, top_p=0.9)).probs(logits)
    scaled = torch.softmax(logits[:4] / 0.5, -1)  # top-4, then nucleus 0.9 over them
    keep = 1 + int((scaled.cumsum(0) < 0.9).sum())
    expect = torch.zeros(5)
    expect[:keep] = torch.softmax(logits[:keep] / 0.5, -1)
    torch.testing.assert_close(p, expect)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_params(kwargs):
    with pytest.raises(SpdError):
        SamplingParams(**kwargs)


def test_bad_prompts():
    target = StagedTarget(tiny_model("llama"))
    with pytest.raises(SpdError, match="empty"):
        generate_ar(target, [], 5)
    with pytest.raises(SpdError, match="context"):
        generate_ar(target, [5] * 256, 5)
    with pytest.warns(UserWarning, match="clamped"):
        gen = generate_ar(target, [5] * 250, 50)
    assert len(gen.tokens) == 6
