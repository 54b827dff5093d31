"""The staged target computes exactly what the HF model computes, for any split and chunking."""

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from spdecode.runtime.errors import SpdError
from spdecode.runtime.staged import StagedTarget, split_layers


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def staged_logits(target, ids, chunks):
    """Feed `ids` in chunks of the given sizes, each chunk through every stage in turn."""
    out, start = [], 0
    with torch.no_grad():
        for size in chunks:
            h = target.embed(torch.tensor([ids[start:start + size]]))
            for s in range(target.n_stages):
                h = target.run_stage(s, h, start)
            out.append(target.logits(h)[0])
            start += size
    return torch.cat(out)


def test_split_layers():
    assert split_layers(30, 4) == [8, 8, 7, 7]
    assert split_layers(30, 1) == [30]
    assert split_layers(6, [1, 2, 3]) == [1, 2, 3]
    for bad in (0, -1, 31):
        with pytest.raises(SpdError):
            split_layers(30, bad)
    for bad in ([1, 2], [0, 6], []):
        with pytest.raises(SpdError):
            split_layers(6, bad)


@pytest.mark.parametrize("stages", [1, 2, 3, 6, [1, 4, 1]])
def test_staged_prefill_equals_full_forward(family, stages):
    model = tiny_model(family)
    ids = torch.randint(3, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    target = StagedTarget(model, stages)
    torch.testing.assert_close(staged_logits(target, ids, [23]), hf_logits(model, ids), rtol=1e-4, atol=1e-4)


@settings(max_examples=12, deadline=None)
@given(chunks=st.lists(st.integers(1, 7), min_size=1, max_size=8), n=st.integers(1, 6),
       family=st.sampled_from(["llama", "gemma3", "mistral"]))
def test_chunked_decode_equals_full_forward(chunks, n, family):
    """Token-by-token and multi-token chunks at explicit positions (sliding windows included)."""
    model = tiny_model(family)
    ids = torch.randint(3, 97, (sum(chunks),), generator=torch.Generator().manual_seed(2)).tolist()
    target = StagedTarget(model, n)
    torch.testing.assert_close(staged_logits(target, ids, chunks), hf_logits(model, ids),
                               rtol=1e-4, atol=1e-4)


def test_rollback_then_rerun_equals_fresh_run(family):
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 97, (12,), generator=gen).tolist()
    wrong = torch.randint(3, 97, (6,), generator=gen).tolist()
    right = torch.randint(3, 97, (6,), generator=gen).tolist()
    target = StagedTarget(model, 3)
    staged_logits(target, prefix + wrong, [12, 1, 1, 1, 1, 1, 1])
    # Roll back stage by stage to different lengths first (as a pipeline flush does), then to 12.
    for s in range(3):
        target.rollback(14 + s, stage=s)
    assert target.cache_lengths() == [14, 15, 16]
    target.rollback(12)
    with torch.no_grad():
        h = target.forward(torch.tensor([right]), 12)
    fresh = hf_logits(model, prefix + right)[12:]
    torch.testing.assert_close(target.logits(h)[0], fresh, rtol=1e-4, atol=1e-4)


def test_non_contiguous_write_is_refused():
    target = StagedTarget(tiny_model("llama"), 2)
    with torch.no_grad():
        target.forward(torch.tensor([[5, 6, 7]]), 0)
        with pytest.raises(RuntimeError, match="writing position 5"):
            target.forward(torch.tensor([[8]]), 5)


def test_context_overflow_is_a_clear_error():
    target = StagedTarget(tiny_model("llama"), 2)
    with pytest.raises(SpdError, match="context"):
        target.reserve(257)
