"""Draft-tree passes over the static cache: every node's logits equal sequential decoding of its path,
and keeping an accepted path leaves a cache that decodes exactly like a fresh one."""

import pytest
import torch
from conftest import FAMILIES, tiny_model

import spdecode.runtime.staged as staged
from spdecode.runtime.staged import StagedTarget
from spdecode.runtime.tree import DraftTree, ancestor_mask

TOL = dict(rtol=1e-5, atol=1e-5)


def random_tree(gen: torch.Generator, m: int, max_depth: int) -> DraftTree:
    """m nodes, each under the root or a random earlier node not already at max_depth."""
    tokens, parents, depths = [], [], []
    for _ in range(m):
        options = [-1] + [j for j, d in enumerate(depths) if d < max_depth]
        p = options[int(torch.randint(len(options), (1,), generator=gen))]
        parents.append(p)
        depths.append(1 if p < 0 else depths[p] + 1)
        tokens.append(int(torch.randint(3, 97, (1,), generator=gen)))
    return DraftTree(tokens, parents)


def deep_tree(gen: torch.Generator) -> DraftTree:
    """A branching tree (10-16 nodes) whose longest path reaches depth 5 (past a window of 5 with the root)."""
    while True:
        tree = random_tree(gen, int(torch.randint(10, 17, (1,), generator=gen)), 5)
        if tree.max_depth == 5 and len(tree.children(-1)) > 1:
            return tree


def sequential_logits(model, prefix: list[int], seq: list[int]) -> torch.Tensor:
    """A fresh cache: prefill `prefix`, then `seq` one token at a time; logits after each of seq [len(seq), V]."""
    target = StagedTarget(model)
    with torch.no_grad():
        target.forward(torch.tensor([prefix]), 0)
        rows = []
        for k, tok in enumerate(seq):
            rows.append(target.logits(target.forward(torch.tensor([[tok]]), len(prefix) + k))[0, -1])
    return torch.stack(rows)


def reference_rows(model, prefix, root, tree) -> torch.Tensor:
    """Row 0: after the root; row 1+i: after the root and node i's path, each decoded sequentially."""
    rows = [sequential_logits(model, prefix, [root])[0]]
    for i in range(len(tree)):
        rows.append(sequential_logits(model, prefix, [root] + [tree.tokens[j] for j in tree.path_to(i)])[-1])
    return torch.stack(rows)


def prefill(target: StagedTarget, ids: list[int]) -> None:
    with torch.no_grad():
        target.forward(torch.tensor([ids]), 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefix_len", [3, 12])
def test_tree_rows_equal_sequential_decoding(family, prefix_len):
    """Every split, one pass (forward_tree) and stage by stage (run_stage_tree); with 12 prefix tokens
    sliding layers (window 5) slide over the prefix and deep nodes lose the root and their first
    ancestors from the window, counted in positions, not slots."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randint(3, 97, (prefix_len,), generator=gen).tolist()
    root = int(torch.randint(3, 97, (1,), generator=gen))
    tree = deep_tree(gen)
    ref = reference_rows(model, prefix, root, tree)
    for n in (1, 2, 3):
        target = StagedTarget(model, n)
        prefill(target, prefix)
        with torch.no_grad():
            got = target.logits(target.forward_tree(root, tree, prefix_len))[0]
            torch.testing.assert_close(got, ref, **TOL)
            assert target.cache_lengths() == [prefix_len + 1 + len(tree)] * n
            target.rollback(prefix_len)
            h = target.embed(torch.tensor([[root, *tree.tokens]]))
            for s in range(n):
                h = target.run_stage_tree(s, h, prefix_len, tree)
            torch.testing.assert_close(target.logits(h)[0], ref, **TOL)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_tree_positions_follow_depth_not_slot(family):
    """Power check: the same tree run with slot positions (the cache's old assumption) is wrong for
    nodes placed after a sibling subtree, so the equality above really tests position handling."""
    model = tiny_model(family)
    prefix = list(range(10, 22))
    tree = DraftTree([5, 6, 7, 8, 9, 10], [-1, 0, 1, -1, 3, 4])  # two chains of 3
    target = StagedTarget(model)
    prefill(target, prefix)
    with torch.no_grad():
        ids = torch.tensor([[4, *tree.tokens]])
        slots = torch.arange(12, 12 + 7)
        h = target.run_layers(0, target.n_layers, target.embed(ids), 12, positions=slots, visible=ancestor_mask(tree))
    ref = reference_rows(model, prefix, 4, tree)
    got = target.logits(h)[0]
    torch.testing.assert_close(got[:4], ref[:4], **TOL)  # the first chain's slots are its positions
    assert not torch.allclose(got[4:], ref[4:], **TOL)


def test_a_chain_tree_equals_a_plain_chunk(family):
    model = tiny_model(family)
    prefix, chain = list(range(20, 29)), [40, 41, 42, 43, 44, 45]
    a, b = StagedTarget(model, 2), StagedTarget(model, 3)
    prefill(a, prefix)
    prefill(b, prefix)
    with torch.no_grad():
        ha = a.forward_tree(7, DraftTree.chain(chain), len(prefix))
        hb = b.forward(torch.tensor([[7, *chain]]), len(prefix))
    torch.testing.assert_close(a.logits(ha), b.logits(hb), **TOL)


def test_single_queries_build_no_mask(monkeypatch):
    """A plain one-token step and an empty tree (the root alone) still attend with no mask."""
    model = tiny_model("gemma3")
    target = StagedTarget(model)
    prefill(target, list(range(3, 15)))

    def no_mask(*args, **kwargs):
        raise AssertionError("a single query built a mask")

    monkeypatch.setattr(staged, "chunk_mask", no_mask)  # every mask, plain or tree, is built there
    with torch.no_grad():
        target.forward(torch.tensor([[5]]), 12)
        target.forward_tree(6, DraftTree((), ()), 13)
    assert target.cache_lengths() == [14]


def greedy_continue(target: StagedTarget, root: int, start: int, steps: int):
    """AR single-token steps from `root` at `start`: (logits of each step [steps, V], the tokens fed)."""
    rows, fed = [], [root]
    with torch.no_grad():
        for k in range(steps):
            row = target.logits(target.forward(torch.tensor([[fed[-1]]]), start + k))[0, -1]
            rows.append(row)
            fed.append(int(torch.argmax(row)))
    return torch.stack(rows), fed


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_path_then_decoding_equals_a_fresh_run(family):
    """Keep a path that is NOT the tree's first nodes (so K/V really move), then decode on: AR steps and
    a second tree pass both match a fresh cache over prefix + root + path (logits, then greedy tokens)."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(3, 97, (9,), generator=gen).tolist()
    start, root = len(prefix), 50
    tree = DraftTree([11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
                     [-1, 0, 1, -1, 3, 0, 5, 6, 7, 4, 9])
    path = [3, 4, 9, 10]  # depth 4, slots start+4, +5, +10, +11
    assert path == tree.path_to(10)
    kept = [root] + [tree.tokens[i] for i in path]
    steps = 8

    fresh = StagedTarget(model)
    with torch.no_grad():
        after = fresh.logits(fresh.forward(torch.tensor([prefix + kept]), 0))[0, -1]
    nxt = int(torch.argmax(after))
    ref_rows, ref_fed = greedy_continue(fresh, nxt, start + len(kept), steps)
    second = deep_tree(gen)
    fresh.rollback(start + len(kept))
    with torch.no_grad():
        ref_tree = fresh.logits(fresh.forward_tree(nxt, second, start + len(kept)))[0]

    for n, stage_wise in ((1, False), (3, False), (3, True)):
        target = StagedTarget(model, n)
        prefill(target, prefix)
        with torch.no_grad():
            rows = target.logits(target.forward_tree(root, tree, start))[0]
        assert int(torch.argmax(rows[1 + path[-1]])) == nxt
        if stage_wise:  # a pipeline keeps a path stage by stage
            for s in range(n):
                target.keep_path(start, path, stage=s)
        else:
            target.keep_path(start, path)
        assert target.cache_lengths() == [start + len(kept)] * n
        got_rows, fed = greedy_continue(target, nxt, start + len(kept), steps)
        torch.testing.assert_close(got_rows, ref_rows, **TOL)
        assert fed == ref_fed

        target.rollback(start + len(kept))
        with torch.no_grad():
            got = target.logits(target.forward_tree(nxt, second, start + len(kept)))[0]
        torch.testing.assert_close(got, ref_tree, **TOL)


def test_keep_path_of_the_root_alone_and_of_a_chain_prefix():
    model = tiny_model("mistral")
    prefix = list(range(30, 41))
    tree = DraftTree.chain([60, 61, 62, 63])
    for path in ([], [0, 1]):
        target = StagedTarget(model, 2)
        prefill(target, prefix)
        with torch.no_grad():
            target.forward_tree(59, tree, len(prefix))
        target.keep_path(len(prefix), path)
        assert target.cache_lengths() == [len(prefix) + 1 + len(path)] * 2
        ref = sequential_logits(model, prefix, [59, *tree.tokens[: len(path)], 70])[-1]
        with torch.no_grad():
            got = target.logits(target.forward(torch.tensor([[70]]), len(prefix) + 1 + len(path)))[0, -1]
        torch.testing.assert_close(got, ref, **TOL)


def test_keep_path_refuses_what_is_not_a_path_or_not_cached():
    target = StagedTarget(tiny_model("llama"))
    prefill(target, [5, 6, 7])
    with torch.no_grad():
        target.forward_tree(8, DraftTree([9, 10, 11], [-1, 0, -1]), 3)
    for bad in ([1, 0], [0, 0], [-1]):
        with pytest.raises(ValueError):
            target.keep_path(3, bad)
    with pytest.raises(RuntimeError):
        target.keep_path(3, [0, 3])  # node 3 was never written
