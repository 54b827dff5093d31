"""Classic speculative decoding (Leviathan et al., Chen et al.) on the staged target.

Each step: the drafter proposes up to gamma tokens; ONE target forward over the last verified
token and the drafts gives the target's distribution at every drafted position; the shared
verification module accepts a prefix and emits a correction (or a bonus token when all pass);
the target's cache is rolled back to what was kept (a length change).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..runtime.errors import SpdError
from ..runtime.generation import Generation, Halt, prefill, start_generation
from ..runtime.metrics import Clock
from ..runtime.sampling import GREEDY, SamplingParams
from ..runtime.staged import StagedTarget
from ..runtime.verify import verify


@torch.inference_mode()
def generate_sd(
    target: StagedTarget,
    drafter,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    sampling: SamplingParams = GREEDY,
    eos: set[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
    gamma: int = 4,
    adaptive: bool = False,
    halt: Halt | None = None,
) -> Generation:
    max_new_tokens, sampler, stop, m = start_generation(target, prompt_ids, max_new_tokens, sampling, eos, "sd",
                                                        lookahead=gamma, n_stages=1, halt=halt)
    drafter.reset()
    tokens = list(prompt_ids) + [prefill(target, prompt_ids, sampler, m, on_token)]
    emitted = [tokens[-1]]
    t1 = time.perf_counter()
    clock = Clock(m.phase_s)
    while not stop.done(emitted):
        m.cycles += 1
        budget = min(gamma, max_new_tokens - len(emitted))
        drafts = drafter.propose(tokens, budget, sampler) if budget > 0 else []
        m.drafts_proposed += len(drafts)
        clock.lap("draft")
        # One target pass: the last verified token (not yet in the cache) followed by the drafts.
        start = len(tokens) - 1
        ids = torch.tensor([[tokens[-1]] + [d.token for d in drafts]], device=target.device)
        logits = target.logits(target.forward(ids, start))[0]
        clock.lap("target")
        kept, checked, accepted = 0, m.drafts_verified, m.drafts_accepted
        for i, d in enumerate(drafts):
            ok, token = verify(logits[i], d, sampler)
            m.drafts_verified += 1
            m.drafts_accepted += ok
            emitted.append(token)
            tokens.append(token)
            if on_token:
                on_token(token)
            if not ok or stop.done(emitted):
                break
            kept += 1
        else:  # every draft accepted (or none proposed): the target's next token comes for free
            token = sampler.choose(logits[len(drafts)])
            emitted.append(token)
            tokens.append(token)
            if on_token:
                on_token(token)
        m.walks.append([m.drafts_verified - checked, m.drafts_accepted - accepted])
        # Valid K/V: everything up to the last verified token before this step, plus the kept drafts.
        target.rollback(start + 1 + kept)
        if adaptive:  # grow gamma after a full accept, shrink it after an early rejection (as HF does)
            gamma = gamma + 2 if kept == len(drafts) and drafts else max(1, gamma - 1)
        clock.lap("verify")
    m.decode_s = time.perf_counter() - t1
    m.new_tokens, m.stop_reason = len(emitted), stop.reason
    return Generation(emitted, m)


def sd_generator(target: StagedTarget, drafter, gamma: int = 4, adaptive: bool = False, tree_budget: int = 0,
                 tree_depth: int = 4, tree_topk: int = 4, method: str = "sd-tree") -> Callable[..., Generation]:
    """generate(prompt_ids, max_new_tokens, sampling, eos, on_token, halt) for classic SD: a chain of
    gamma drafts per target pass, or with tree_budget > 0 a draft tree of that many nodes, at most
    tree_depth deep, verified in one pass: the SPD core with one stage (spd.generate_spd) with
    prompt lookup's earlier continuations, a draft model's (early exit's) dynamic tree expanding
    tree_topk children per node, or an engine-core drafter (a SlotDrafter: eagle's head)."""
    if tree_budget < 0 or tree_depth < 1 or gamma < 1 or tree_topk < 1:
        raise SpdError(f"need gamma >= 1, tree budget >= 0, tree depth >= 1 and tree top-k >= 1 (got {gamma}, "
                       f"{tree_budget}, {tree_depth}, {tree_topk})")
    if not tree_budget:
        if not hasattr(drafter, "propose"):
            raise SpdError("this drafter proposes draft trees only: give it a tree budget of at least 1")
        return lambda ids, k, s=GREEDY, e=frozenset(), on_token=None, halt=None: generate_sd(
            target, drafter, ids, k, s, e, on_token, gamma=gamma, adaptive=adaptive, halt=halt)
    from ..drafting.drafters import TokenTreeDrafter
    from .spd import generate_spd
    from .spd_core import TreeShape

    if not hasattr(drafter, "grow"):
        if not hasattr(drafter, "propose_tree"):
            raise SpdError("--tree-budget needs a drafter that proposes trees: prompt-lookup, early-exit:K or "
                           "model:PATH")
        drafter = TokenTreeDrafter(drafter, method)
    shape = TreeShape(tree_budget, tree_depth, tree_topk)
    return lambda ids, k, s=GREEDY, e=frozenset(), on_token=None, halt=None: generate_spd(
        target, drafter, ids, k, s, e, on_token, shape=shape, method=method, halt=halt)
