"""Speculative decoding over a draft tree: many candidate continuations verified in one target pass.

Each step the drafter proposes a tree of candidate tokens rooted at the last verified token. ONE
target forward runs the root and every node at its true position under a tree mask (a node sees
the committed prefix and its ancestors), so the pass costs about as much as a short chain while
covering several guesses per depth. The shared verification module walks the tree
(`verify_tree`): the target chooses its token at the root, the walk moves into the child that
carries it, and so on; the first choice no child carries is the target's own token after the
path. The K/V of the accepted path are gathered into place (`keep_path`) and the rest forgotten.
Greedy output is AR's; sampled output follows AR's distribution exactly (see verify_tree).

A feature-level drafter (EAGLE-style, drafting/eagle.py) lists `anchors`: the pass then also
captures those hidden states, and the drafter `observe`s them for the root and the accepted path
(the prompt's come from the prefill): the tokens the target has processed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..runtime.generation import Generation, prefill, start_generation
from ..runtime.metrics import Clock
from ..runtime.sampling import GREEDY, SamplingParams
from ..runtime.staged import StagedTarget
from ..runtime.tree import DraftTree
from ..runtime.verify import verify_tree


@torch.inference_mode()
def generate_tree_sd(
    target: StagedTarget,
    drafter,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    sampling: SamplingParams = GREEDY,
    eos: set[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
    budget: int = 8,
    depth: int = 4,
    topk: int = 4,
) -> Generation:
    """`drafter.propose_tree(tokens, budget, depth, topk)` gives a DraftTree (None: no guess this
    step); `topk`: children per expanded node, for drafters that grow trees from distributions."""
    anchors = getattr(drafter, "anchors", None)  # a FeatureDrafter's (protocols.py): eagle
    observe = drafter.observe if anchors else None
    # Tree nodes take up to `budget` slots past the root: they must fit in the cache and context.
    max_new_tokens, sampler, stop, m = start_generation(target, prompt_ids, max_new_tokens, sampling, eos,
                                                        "eagle" if anchors else "sd-tree", lookahead=budget, n_stages=1)
    drafter.reset()
    tokens = list(prompt_ids) + [prefill(target, prompt_ids, sampler, m, on_token, observe, anchors or ())]
    emitted = [tokens[-1]]
    m.verified_per_depth, m.accepted_per_depth = [0] * depth, [0] * depth
    t1 = time.perf_counter()
    clock = Clock(m.phase_s)
    while not stop.done(emitted):
        m.cycles += 1
        tree = drafter.propose_tree(tokens, budget, depth, topk) or DraftTree((), ())
        m.drafts_proposed += len(tree.tokens)
        clock.lap("draft")
        start = len(tokens) - 1  # the root: the last verified token, not in the cache yet
        if observe:
            h, got = target.forward_tree(tokens[-1], tree, start, capture=anchors)
        else:
            h = target.forward_tree(tokens[-1], tree, start)
        logits = target.logits(h)[0]
        clock.lap("target")
        path, token = verify_tree(logits, tree, sampler)
        # One verification per depth walked into: accepted when the walk went on into a child.
        last = path[-1] if path else -1
        tried = len(path) + bool(tree.children(last))
        m.drafts_accepted += len(path)
        m.drafts_verified += tried
        for d in range(min(tried, depth)):
            m.verified_per_depth[d] += 1
            m.accepted_per_depth[d] += d < len(path)
        target.keep_path(start, path)
        if observe:
            rows = [0] + [1 + i for i in path]
            observe(start, {j: got[j][0, rows] for j in anchors})
        for t in [tree.tokens[i] for i in path] + [token]:
            emitted.append(t)
            tokens.append(t)
            if on_token:
                on_token(t)
            if stop.done(emitted):
                break
        clock.lap("verify")
    m.decode_s = time.perf_counter() - t1
    m.new_tokens, m.stop_reason = len(emitted), stop.reason
    return Generation(emitted, m)
