"""Speculative decoding over draft trees: greedy equals AR, the tree's right path is taken whole,
sampling follows AR's distribution; prompt lookup's trie of earlier continuations."""

import random

import pytest
from conftest import tiny_model
from distribution import sampled_vs_exact

from spdecode.drafting.candidates import PromptLookupCandidates, trie
from spdecode.methods.ar import generate_ar
from spdecode.methods.sd import sd_generator
from spdecode.runtime.errors import SpdError
from spdecode.runtime.staged import StagedTarget
from spdecode.runtime.tree import DraftTree

PROMPT = [5, 17, 42, 8, 33, 71, 9, 5, 17, 42, 8, 60, 5, 17]


def generate_tree_sd(target, drafter, prompt, k, params=None, eos=frozenset(), budget=8, depth=4, topk=4):
    """Speculative decoding over a tree from a token-level drafter: the SPD core with one stage."""
    from spdecode.runtime.sampling import GREEDY

    return sd_generator(target, drafter, tree_budget=budget, tree_depth=depth, tree_topk=topk)(
        prompt, k, params or GREEDY, eos)


def test_trie_merges_shared_prefixes_in_order_within_the_budget():
    tree = trie([[1, 2, 3], [1, 2, 4], [5], [1, 6, 7]], budget=10)
    assert tree.tokens == (1, 2, 3, 4, 5, 6, 7)
    assert tree.parents == (-1, 0, 1, 1, -1, 0, 5)
    small = trie([[1, 2, 3], [1, 2, 4], [5]], budget=3)
    assert small.tokens == (1, 2, 3)  # earlier sequences keep their nodes
    assert trie([], 4) is None


def test_prompt_lookup_tree_offers_every_earlier_continuation():
    ctx = [9, 1, 2, 3, 9, 1, 2, 4, 8, 1, 2]  # "1 2" was followed by 3 and by 4
    tree = PromptLookupCandidates(97).propose_tree(ctx, budget=8, depth=2)
    firsts = {tree.tokens[i] for i in tree.children(-1)}
    assert firsts == {3, 4}
    assert max(tree.depth(i) for i in range(len(tree.tokens))) <= 2


class OracleTree:
    """A tree holding the target's greedy path (`right_depth` deep) among wrong siblings at every depth."""

    def __init__(self, prompt, reference, right_depth, width=3, seed=0):
        self.expected, self.right_depth, self.width = list(prompt) + list(reference), right_depth, width
        self.rng = random.Random(seed)

    def reset(self):
        pass

    def propose_tree(self, tokens, budget, depth, topk=0):
        n = len(tokens)
        if tokens != self.expected[:n]:
            return None
        toks, parents, parent = [], [], -1
        for d, t in enumerate(self.expected[n : n + depth]):
            right = d < self.right_depth
            wrong = [(t + k) % 97 for k in range(1, self.width)]
            here = [t] + wrong if right else wrong
            self.rng.shuffle(here)
            for x in here:
                toks.append(x)
                parents.append(parent)
            if not right:
                break
            parent = len(toks) - len(here) + here.index(t)
        return DraftTree(tuple(toks), tuple(parents))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request):
    model = tiny_model(request.param)
    return model, generate_ar(StagedTarget(model), PROMPT, 40).tokens


@pytest.mark.parametrize("budget", [4, 16])
def test_prompt_lookup_tree_greedy_equals_ar(tiny, budget):
    model, ref = tiny
    gen = generate_tree_sd(StagedTarget(model), PromptLookupCandidates(97), PROMPT, 40, budget=budget, depth=4)
    assert gen.tokens == ref


@pytest.mark.parametrize("right_depth,depth", [(4, 4), (2, 4), (0, 3)])
def test_the_trees_right_path_is_taken_whole(tiny, right_depth, depth):
    model, ref = tiny
    gen = generate_tree_sd(StagedTarget(model), OracleTree(PROMPT, ref, right_depth), PROMPT, 40, budget=16,
                           depth=depth)
    assert gen.tokens == ref
    m = gen.metrics
    # Every pass emits the right path plus the target's own token, except where the budget ends.
    per_pass = min(right_depth, depth) + 1
    assert m.cycles == -(-(len(ref) - 1) // per_pass)
    assert m.drafts_accepted >= (m.cycles - 1) * min(right_depth, depth)


def test_eos_inside_the_tree_is_never_passed(tiny):
    model, ref = tiny
    eos = ref[6]
    gen = generate_tree_sd(StagedTarget(model), OracleTree(PROMPT, ref, 4), PROMPT, 40, eos={eos}, budget=16)
    assert gen.tokens == ref[: ref.index(eos) + 1] and gen.metrics.stop_reason == "eos"


def test_sd_generator_refuses_trees_from_a_drafter_that_has_none():
    model = tiny_model("llama")

    class ChainsOnly:
        def reset(self):
            pass

        def propose(self, tokens, gamma, sampler):
            return []

    with pytest.raises(SpdError, match="proposes trees"):
        sd_generator(StagedTarget(model), ChainsOnly(), tree_budget=8)


def test_best_first_tree_keeps_the_most_likely_paths_and_their_ancestors():
    """Fixed drafter: after any node, token 1 has probability 0.6, token 2 0.3, token 3 0.1."""
    import math

    import torch

    from spdecode.drafting.tree_build import best_first_tree

    lp = torch.log(torch.tensor([1e-9, 0.6, 0.3, 0.1]))
    tree = best_first_tree(lambda t, frontier: lp.expand(len(frontier), 4), budget=5, depth=3, topk=2)
    assert len(tree.tokens) == 5 and all(p < i for i, p in enumerate(tree.parents))
    paths = sorted(tuple(tree.tokens[j] for j in tree.path_to(i)) for i in range(5))
    # The five most likely paths of the expanded ones: 1 (.6), 1-1 (.36), 2 (.3), 1-1-1 (.216), 1-2 (.18).
    assert paths == sorted([(1,), (1, 1), (2,), (1, 1, 1), (1, 2)])
    assert math.isclose(sum(1 for i in range(5) if tree.parents[i] == -1), 2)


@pytest.mark.parametrize("layers", [2, 4])
def test_early_exit_dynamic_tree_greedy_equals_ar(tiny, layers):
    model, ref = tiny
    from spdecode.drafting.candidates import early_exit_candidates

    gen = sd_generator(StagedTarget(model), early_exit_candidates(model, layers), tree_budget=8, tree_depth=3,
                       tree_topk=3)(PROMPT, 40)
    assert gen.tokens == ref
    assert gen.metrics.cycles < len(ref) - 1 or layers == 2  # the 4-layer exit of 6 guesses right at times


def test_tree_sd_sampling_matches_ar_distribution():
    model = tiny_model("llama", num_hidden_layers=3)
    prompt, length = [5, 6, 7, 5, 6, 8, 5, 6], 3
    target = StagedTarget(model)

    class Branchy:  # the target's own top tokens as siblings: accepts often, both ways
        def reset(self):
            pass

        def propose_tree(self, tokens, budget, depth, topk=0):
            return DraftTree((7, 8, 9, 7, 8), (-1, -1, -1, 0, 0))

    tv, noise = sampled_vs_exact(model, prompt, length, 2500,
                                 lambda params: generate_tree_sd(target, Branchy(), prompt, length, params).tokens)
    assert tv < 1.6 * noise, (tv, noise)
