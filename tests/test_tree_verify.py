"""Draft trees: the DraftTree structure, and verify_tree: greedy takes the target's own path, sampling
emits exactly AR's distribution (and deliberately wrong tree verifiers are caught)."""

import collections

import pytest
import torch
from conftest import tiny_model
from distribution import sampled_vs_exact
from hypothesis import given, settings
from hypothesis import strategies as st

from spdecode.methods.ar import generate_ar
from spdecode.runtime.sampling import GREEDY, Sampler, SamplingParams
from spdecode.runtime.staged import StagedTarget
from spdecode.runtime.tree import DraftTree, ancestor_mask
from spdecode.runtime.verify import verify_tree

PROMPT = [5, 17, 42, 8, 33, 71, 9, 5, 17, 42]


# -- the structure -------------------------------------------------------------------------------

def test_draft_tree_basics():
    t = DraftTree([10, 11, 12, 13, 14], [-1, 0, -1, 1, 0])
    assert [t.depth(i) for i in range(5)] == [1, 2, 1, 3, 2]
    assert t.depth(-1) == 0 and t.max_depth == 3 and len(t) == 5
    assert t.children(-1) == [0, 2] and t.children(0) == [1, 4] and t.children(3) == []
    assert t.path_to(3) == [0, 1, 3] and t.path_to(2) == [2] and t.path_to(-1) == []
    assert t.positions(7) == [7, 8, 9, 8, 10, 9]
    assert t == DraftTree((10, 11, 12, 13, 14), (-1, 0, -1, 1, 0))  # lists become tuples
    c = DraftTree.chain([4, 5, 6])
    assert c.parents == (-1, 0, 1) and c.path_to(2) == [0, 1, 2]
    assert len(DraftTree.chain([])) == 0 and DraftTree((), ()).children(-1) == []


@pytest.mark.parametrize("tokens, parents", [([1, 2], [-1]), ([1], [-1, 0]), ([1, 2], [-1, 1]),
                                             ([1, 2], [0, -1]), ([1, 2], [-1, -2]), ([1, 2, 3], [-1, 2, 0])])
def test_draft_tree_validation(tokens, parents):
    with pytest.raises(ValueError):
        DraftTree(tokens, parents)


@st.composite
def trees(draw):
    m = draw(st.integers(0, 12))
    parents = [draw(st.integers(-1, i - 1)) for i in range(m)]
    return DraftTree(draw(st.lists(st.integers(0, 96), min_size=m, max_size=m)), parents)


@settings(max_examples=60, deadline=None)
@given(tree=trees())
def test_ancestor_mask_is_root_ancestors_and_self(tree):
    m = len(tree)
    mask = ancestor_mask(tree)
    assert mask.shape == (1 + m, 1 + m) and mask.dtype == torch.bool
    assert mask[:, 0].all() and not mask[0, 1:].any()
    for i in range(m):
        seen = {j for j in range(m) if mask[1 + i, 1 + j]}
        assert seen == set(tree.path_to(i))
        assert tree.depth(i) == len(tree.path_to(i)) == int(mask[1 + i].sum()) - 1
        assert all(tree.parents[c] == i for c in tree.children(i))
    assert sorted(c for i in range(-1, m) for c in tree.children(i)) == list(range(m))


# -- greedy --------------------------------------------------------------------------------------

def one_hot_rows(argmaxes, vocab=8):
    rows = torch.zeros(len(argmaxes), vocab)
    rows[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return rows


def test_greedy_walk_on_given_logits():
    sampler = Sampler(GREEDY)
    # root -> 2 (EOS) -> 3 -> 4: the walk does not stop at EOS, the caller cuts.
    tree = DraftTree([5, 2, 3, 1, 3], [-1, -1, 1, 1, 2])
    logits = one_hot_rows([2, 0, 3, 3, 0, 7])  # rows: root, node 0, ..., node 4
    assert verify_tree(logits, tree, sampler) == ([1, 2, 4], 7)
    assert verify_tree(one_hot_rows([6, 0, 0, 0, 0, 0]), tree, sampler) == ([], 6)
    assert verify_tree(one_hot_rows([4]), DraftTree((), ()), sampler) == ([], 4)
    # Siblings carrying the same token: the first one is taken.
    assert verify_tree(one_hot_rows([3, 1, 5]), DraftTree([3, 3], [-1, -1]), sampler) == ([0], 1)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def greedy_case(request):
    model = tiny_model(request.param)
    return model, generate_ar(StagedTarget(model), PROMPT, 12).tokens


def tree_pass(model, prefix, root, tree):
    target = StagedTarget(model, 2)
    with torch.no_grad():
        target.forward(torch.tensor([prefix]), 0)
        return target.logits(target.forward_tree(root, tree, len(prefix)))[0]


def test_greedy_oracle_tree_returns_the_whole_path(greedy_case):
    model, g = greedy_case
    # The target's path g1 g2 g3 hides among wrong siblings (placed first) and a decoy subtree that
    # repeats g2 under a wrong parent.
    w = [(t + 1) % 97 for t in g]
    tree = DraftTree([w[1], g[1], g[2], w[2], g[3], g[2]],
                     [-1, -1, 1, 1, 2, 0])
    path, bonus = verify_tree(tree_pass(model, PROMPT, g[0], tree), tree, Sampler(GREEDY))
    assert path == [1, 2, 4] and bonus == g[4]  # tau = depth + 1 = 4 tokens


def test_greedy_wrong_and_mixed_trees(greedy_case):
    model, g = greedy_case
    w = [(t + 1) % 97 for t in g]
    wrong = DraftTree([w[1], (g[1] + 2) % 97, g[2]], [-1, -1, 0])
    assert verify_tree(tree_pass(model, PROMPT, g[0], wrong), wrong, Sampler(GREEDY)) == ([], g[1])
    mixed = DraftTree([g[1], g[2], w[3], w[2], g[3]], [-1, 0, 1, 0, 3])
    assert verify_tree(tree_pass(model, PROMPT, g[0], mixed), mixed, Sampler(GREEDY)) == ([0, 1], g[3])


# -- decoding with trees -------------------------------------------------------------------------

class TreeBuilder:
    """Trees from a model's top tokens: `widths[d]` children under each node at depth d. Memoised by
    prefix (a tree is a function of the prefix), together with the model's warped q at every node."""

    def __init__(self, model, widths, sampler_params=None):
        self.model, self.widths = model, widths
        self.sampler = Sampler(sampler_params) if sampler_params else None
        self.memo = {}

    def _logits(self, ids):
        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0, -1].float()

    def __call__(self, prefix):
        key = tuple(prefix)
        if key not in self.memo:
            tokens, parents, q = [], [], []
            frontier = [(-1, list(prefix))]
            for width in self.widths:
                nxt = []
                for node, ids in frontier:
                    logits = self._logits(ids)
                    if self.sampler:
                        q.append((node, self.sampler.probs(logits)))
                    for tok in torch.topk(logits, width).indices.tolist():
                        tokens.append(tok)
                        parents.append(node)
                        nxt.append((len(tokens) - 1, ids + [tok]))
                frontier = nxt
            self.memo[key] = DraftTree(tokens, parents), dict(q)
        return self.memo[key]


def tree_decode(target, sampler, prompt, n_new, build, verifier=verify_tree, first=None):
    """Decode with trees: the root is the target's token after the prompt, then repeated
    forward_tree + verify + keep_path. `first`: the prompt's last logits (the prompt already cached)."""
    with torch.no_grad():
        if first is None:
            target.rollback(0)
            first = target.logits(target.forward(torch.tensor([prompt]), 0))[0, -1]
        target.rollback(len(prompt))
        out = [sampler.choose(first)]
        while len(out) < n_new:
            start = len(prompt) + len(out) - 1
            tree, _ = build(prompt + out)
            logits = target.logits(target.forward_tree(out[-1], tree, start))[0]
            path, token = verifier(logits, tree, sampler)
            target.keep_path(start, path)
            out += [tree.tokens[i] for i in path] + [token]
    return out[:n_new]


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
def test_greedy_tree_decoding_equals_ar(family):
    """Trees of a different model's top tokens (sometimes right, mostly not) and of the target's own
    (always right along the first child): both give AR's tokens, the second in fewer passes."""
    model = tiny_model(family)
    ref = generate_ar(StagedTarget(model), PROMPT, 30).tokens
    target = StagedTarget(model, 3)
    drafter = TreeBuilder(tiny_model(family, seed=1), [3, 2, 1])
    assert tree_decode(target, Sampler(GREEDY), PROMPT, 30, drafter) == ref
    own = TreeBuilder(model, [2, 2, 1])
    assert tree_decode(target, Sampler(GREEDY), PROMPT, 30, own) == ref
    assert len(own.memo) <= 30 // 4 + 1  # every pass emits depth + 1 = 4 tokens


# -- sampling: exact AR distribution -------------------------------------------------------------

LENGTH = 3  # the root drawn from the prompt's logits, then tokens from one or two tree passes


def tree_sampler_run(model, build, verifier=verify_tree):
    """run(params) -> the first LENGTH tokens, the prompt prefilled once and kept across samples."""
    target = StagedTarget(model)
    with torch.no_grad():
        first = target.logits(target.forward(torch.tensor([PROMPT]), 0))[0, -1]
    return lambda params: tree_decode(target, Sampler(params), PROMPT, LENGTH, build, verifier, first)


VARIANTS = {
    # family, sampling, where the tree's tokens come from (the target's own top tokens, or a good
    # drafter's: the target with a noisy head), widths per depth ([1, 1]: a chain)
    "chain-drafter-topk4": ("llama", dict(temperature=0.9, top_k=4, top_p=1.0), "drafter", [1, 1]),
    "tree-target-topk3-hot": ("gemma3", dict(temperature=1.5, top_k=3, top_p=1.0), "target", [3, 2]),
    "tree-drafter-topk8-topp": ("mistral", dict(temperature=1.2, top_k=8, top_p=0.6), "drafter", [3, 2]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tree_sampling_matches_ar_distribution(variant):
    """Relative threshold (tests/distribution.py): the distance to the exact AR distribution of the
    first tokens must be within the noise of as many exact samples. The trees must really be used:
    paths of every depth get accepted."""
    family, params, source, widths = VARIANTS[variant]
    model = tiny_model(family)
    build = TreeBuilder(model if source == "target" else near_drafter(family), widths)
    accepted = collections.Counter()

    def counting(logits, tree, sampler):
        path, token = verify_tree(logits, tree, sampler)
        accepted[len(path)] += 1
        return path, token

    tv, noise = sampled_vs_exact(model, PROMPT, LENGTH, 2000, tree_sampler_run(model, build, counting), params)
    assert tv < 1.6 * noise, (tv, noise)
    assert accepted[len(widths)] >= 100, accepted  # whole paths accepted, not just roots emitted


def accept_target_topk(logits, tree, sampler, k=2):
    """WRONG: move into the first child whose token is among the target's k most likely."""
    path, node = [], -1
    while True:
        p = sampler.probs(logits[node + 1])
        top = set(torch.topk(p, k).indices.tolist())
        nxt = next((c for c in tree.children(node) if tree.tokens[c] in top), None)
        if nxt is None:
            return path, sampler.draw(p)
        path.append(nxt)
        node = nxt


def accept_first_child(logits, tree, sampler):
    """WRONG: always move into the first child."""
    path, node = [], -1
    while tree.children(node):
        node = tree.children(node)[0]
        path.append(node)
    return path, sampler.draw(sampler.probs(logits[node + 1]))


def sequential_rejection(build):
    """WRONG: the single-draft rule min(1, p/q) tried on each child in turn, the residual max(p - q, 0)
    after each rejection, as if the (deterministic, top-k) children had been drawn from q."""

    def verifier(logits, tree, sampler):
        q_at = build.last_q
        path, node = [], -1
        while True:
            p = sampler.probs(logits[node + 1])
            q = q_at.get(node)
            for c in tree.children(node):
                x = tree.tokens[c]
                if sampler.uniform(p.device) * float(q[x]) <= float(p[x]):
                    path.append(c)
                    node = c
                    break
                residual = torch.clamp(p - q, min=0)
                p = residual / residual.sum() if float(residual.sum()) > 0 else p
            else:
                return path, sampler.draw(p)

    return verifier


def near_drafter(family, noise=0.5):
    """The target with noise on its head: a good drafter, whose q is close to p."""
    model = tiny_model(family)
    w = model.lm_head.weight
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * w.std() * noise)
    return model


class QBuilder(TreeBuilder):
    """A TreeBuilder that also remembers the q rows of the tree it built last (for the verifier)."""

    def __call__(self, prefix):
        tree, q = super().__call__(prefix)
        self.last_q = q
        return tree, q


@pytest.mark.parametrize("wrong", ["target-topk", "rejection-over-topk", "first-child"])
def test_distribution_test_catches_wrong_tree_verifiers(wrong):
    """The threshold has power: each plausible-looking but wrong rule lands far outside the noise."""
    params = dict(temperature=0.9, top_k=4, top_p=1.0)
    model = tiny_model("llama")
    if wrong == "rejection-over-topk":
        # A good drafter (q near p) is where treating top-k children as draws from q goes most wrong.
        build = QBuilder(near_drafter("llama"), [3, 2], SamplingParams(**params))
        verifier = sequential_rejection(build)
    else:
        build = TreeBuilder(model if wrong == "target-topk" else tiny_model("llama", seed=1), [3, 2])
        verifier = accept_target_topk if wrong == "target-topk" else accept_first_child
    tv, noise = sampled_vs_exact(model, PROMPT, LENGTH, 1000, tree_sampler_run(model, build, verifier), params)
    assert tv > 3 * noise, (tv, noise)
