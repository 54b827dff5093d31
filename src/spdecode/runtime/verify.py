"""Verification of draft tokens against the target: the one module every speculative method uses.

Greedy: accept iff the draft is the target's argmax; otherwise emit the argmax.
Sampling (Leviathan et al. / Chen et al.): the draft x was drawn from q; accept it with probability
min(1, p(x)/q(x)), otherwise draw from normalize(max(p - q, 0)). Then the emitted token is
distributed exactly as p, whatever q is. p and q are warped by the same Sampler (temperature,
top-k, top-p), so "exactly p" means exactly what AR sampling with those settings draws.

A draft over a vocabulary subset is scattered into the full vocabulary with zeros outside it;
the residual then covers the tokens the drafter can never propose.

Draft trees (`target_choices`, the engine core's walk in methods/schedule.py, `verify_tree` for one
tree): the target picks its own token at each node and the walk follows a child carrying it; see
there for why that is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import Sampler
from .tree import DraftTree


@dataclass
class Draft:
    token: int  # proposed token id (in the target's vocabulary)
    q: torch.Tensor | None  # full-vocabulary distribution it was drawn from (None when greedy)


def propose(logits: torch.Tensor, sampler: Sampler, vocab: torch.Tensor | None = None, vocab_size: int = 0) -> Draft:
    """Turn a drafter's logits [Vd] into a Draft; `vocab` maps draft ids to target ids (None = identity)."""
    if sampler.params.greedy:
        i = int(torch.argmax(logits))
        return Draft(i if vocab is None else int(vocab[i]), None)
    q_sub = sampler.probs(logits)
    i = sampler.draw(q_sub)
    if vocab is None:
        return Draft(i, q_sub)
    q = torch.zeros(vocab_size, dtype=q_sub.dtype, device=q_sub.device)
    q[vocab] = q_sub
    return Draft(int(vocab[i]), q)


def verify(target_logits: torch.Tensor, draft: Draft, sampler: Sampler) -> tuple[bool, int]:
    """Decide one drafted position from the target's logits [V] there: (accepted, emitted token)."""
    if sampler.params.greedy:
        best = int(torch.argmax(target_logits))
        return best == draft.token, best
    p = sampler.probs(target_logits)
    x = draft.token
    u = sampler.uniform(p.device)
    # u * q(x) <= p(x) is u <= p/q without dividing by a tiny q.
    if u * float(draft.q[x]) <= float(p[x]):
        return True, x
    residual = torch.clamp(p - draft.q, min=0)
    total = float(residual.sum())
    # A zero residual means p <= q everywhere, i.e. p == q up to rounding: p itself is right then.
    return False, sampler.draw(residual / total if total > 0 else p)


def target_choices(logits: torch.Tensor, sampler: Sampler, successors=None) -> list[int]:
    """The target's token after each row of a draft-tree chunk, from its logits [q, V]: what the
    engine core's walk follows (methods/schedule.py).

    Greedy: the argmax. Sampling: a fresh draw from the warped p of the row, except where the
    row's only child was itself drawn from a distribution q (`successors[i]`, a Draft: SPD as
    published, one draft per slot): then the single-draft rejection rule decides (`verify`),
    which accepts that child with probability min(1, p/q) instead of p. Either way the token is
    distributed exactly as p given the row's prefix, and the walk goes on into a child only when
    the token is that child's: so the emitted sequence follows AR's distribution.
    """
    if sampler.params.greedy:
        return logits.argmax(-1).tolist()
    successors = successors or [None] * logits.shape[0]
    out = []
    for row, d in zip(logits, successors, strict=True):
        out.append(verify(row, d, sampler)[1] if d is not None and d.q is not None else sampler.choose(row))
    return out


def verify_tree(logits: torch.Tensor, tree: DraftTree, sampler: Sampler) -> tuple[list[int], int]:
    """(accepted nodes along one path from the root, the target's own token after the path) for
    one pass over a root and `tree` (`logits` [1 + m, V]: row 0 after the root, row 1 + i after
    node i's path): the walk of the engine core (methods/schedule.py) on a single tree.

    The target's choice at every row comes from `target_choices` (greedy: the argmax; sampling:
    a draw from the warped p of that row, independent of every other row's); from the root, the
    walk moves into the child that carries the choice, and stops at the first choice no child
    carries. Exact by construction: each emitted token is a draw from p given the real prefix.
    Greedy accepts the longest path whose every node is the target's argmax at its parent. The
    price of never using the drafter's q: a node is accepted with probability p(token) rather
    than min(1, p/q). EOS is the caller's: a returned path may run past an EOS token.
    """
    choices = target_choices(logits, sampler)
    path, node = [], -1
    while True:
        token = choices[node + 1]
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
        if nxt is None:
            return path, token
        path.append(nxt)
        node = nxt
