"""The compact Llama-family layer (runtime/compact_layer.py) computes what HF's layer computes, bit
for bit in fp32 and bf16, on every path the stage executor runs: a prefill, one-row steps, and a
draft tree's chunk with its mask; families with more in their layers keep HF's."""

import pytest
import torch
from conftest import FAMILIES, tiny_model

from spdecode.runtime.compact_layer import CompactLlamaLayer, compactable
from spdecode.runtime.staged import StagedTarget
from spdecode.runtime.tree import DraftTree

COMPACT = {"llama", "qwen2", "mistral"}


@pytest.mark.parametrize("family", FAMILIES)
def test_only_plain_llama_family_layers_are_compacted(family):
    t = StagedTarget(tiny_model(family))
    assert all(compactable(layer) == (family in COMPACT) for layer in t.layers)
    assert all(isinstance(s, CompactLlamaLayer) == (family in COMPACT) for s in t.step_layers)


def run_all_paths(target, prompt, steps, tree):
    """Hidden states of a prefill, one-row steps, then a tree pass, on a fresh cache."""
    out = []
    with torch.inference_mode():
        target.reserve(64)
        target.rollback(0)
        out.append(target.forward(torch.tensor([prompt]), 0))
        pos = len(prompt)
        for tok in steps:
            out.append(target.forward(torch.tensor([[tok]]), pos))
            pos += 1
        out.append(target.forward_tree(3, tree, pos))
    return out


@pytest.mark.parametrize("family", sorted(COMPACT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compact_layer_is_bit_identical_to_hf(family, dtype):
    model = tiny_model(family)
    with torch.no_grad():  # HF initialises biases to zero and norms to one: give both real values
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    assert family != "qwen2" or model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    compact, hf = StagedTarget(model), StagedTarget(model)
    hf.step_layers = list(hf.layers)
    tree = DraftTree(tokens=[5, 6, 7, 8], parents=[-1, -1, 0, 0])
    prompt, steps = [4, 11, 19, 23, 31, 40, 41, 50, 60, 61], [70, 12, 13, 14, 15, 16]
    got, want = run_all_paths(compact, prompt, steps, tree), run_all_paths(hf, prompt, steps, tree)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and torch.equal(g, w)
    # A deliberately wrong rotary sign (rotate_half's minus on the other half) must show.
    wrong = StagedTarget(model)
    orig = CompactLlamaLayer.forward

    def flipped(self, hidden, attention_mask=None, position_embeddings=None, **kw):
        cos, sin = position_embeddings
        return orig(self, hidden, attention_mask, position_embeddings=type(position_embeddings)(cos, -sin), **kw)

    CompactLlamaLayer.forward = flipped
    try:
        bad = run_all_paths(wrong, prompt, steps, tree)
    finally:
        CompactLlamaLayer.forward = orig
    assert not torch.equal(bad[-1], want[-1])
