"""The PDM's training layout: every row of a sequence sees exactly what it sees at inference.

At inference, when the newest in-flight token sits at position t and k tokens are in flight
(k = n in steady state, fewer right after a rollback), the PDM rows are:
- completed positions p <= t-k: the deepest type, a plain causal stream;
- in-flight positions p = t-c for c = 0..k-1: type f(c) (depth c), attending to the completed
  stream before the window and to the in-flight rows before them at *their* depths.

Training lays out k+1 blocks of the S positions: block c (c < k) holds every position as if it
were at depth c, block k the deepest type. Row p of block b then attends to
- the completed block at p' <= p - (k - b)   (a shifted causal triangle),
- block c at p' = p - (c - b) for c = b..k-1  (one diagonal each: the row itself and the deeper
  in-flight rows of the same window).
For the completed block (b = k) that is plain causal attention. Only the triangle is O(S^2); the
diagonals are O(S) each, so this costs about (k+1) S^2 instead of the reference's dense
((n+1) S)^2 mask, and every query's depth is its true depth (no representative-depth mapping).
Row p of block 0 is the newest token of its window: its logits are the draft for p+1.

The layout runs the PDM's own HF decoder layers (same projections, norms and rotary) with this
function registered as their attention implementation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_NAME = "spd_lag_blocks"


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def lag_block_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        spd_blocks=None, **kwargs):
    """query/key/value [B, heads, (k+1)*S, D] in the block layout above; returns ([B, (k+1)*S, heads, D], None).

    Sequences of a batch are right-padded to S: a row only ever sees positions at or before its own,
    so padding never reaches a real row."""
    k, S = spd_blocks
    B, heads, D = query.shape[0], query.shape[1], query.shape[-1]
    scaling = scaling if scaling is not None else D**-0.5
    key = _repeat_kv(key, heads // key.shape[1])
    value = _repeat_kv(value, heads // value.shape[1])
    Q = query.reshape(B, heads, k + 1, S, D)
    K = key.reshape(B, heads, k + 1, S, D)
    V = value.reshape(B, heads, k + 1, S, D)
    idx = torch.arange(S, device=query.device)
    outs = []
    for b in range(k + 1):
        offset = k - b if b < k else 0
        tri = (Q[:, :, b] @ K[:, :, k].transpose(-1, -2)) * scaling  # [B, heads, S, S] vs the completed block
        tri = tri.masked_fill(idx[None, :] > idx[:, None] - offset, float("-inf"))
        diag_s, diag_v = [], []
        for c in range(b, k if b < k else b):
            e = c - b  # the row at depth c of the same window sits e positions earlier
            kc = F.pad(K[:, :, c, : S - e], (0, 0, e, 0))
            vc = F.pad(V[:, :, c, : S - e], (0, 0, e, 0))
            s = (Q[:, :, b] * kc).sum(-1) * scaling
            diag_s.append(s.masked_fill(idx < e, float("-inf"))[..., None])
            diag_v.append(vc)
        probs = torch.softmax(torch.cat([tri, *diag_s], dim=-1), dim=-1)
        out = probs[..., :S] @ V[:, :, k]
        for j, vc in enumerate(diag_v):
            out = out + probs[..., S + j, None] * vc
        outs.append(out)
    return torch.stack(outs, dim=2).reshape(B, heads, (k + 1) * S, D).transpose(1, 2), None


AttentionInterface.register(ATTN_NAME, lag_block_attention)


@contextlib.contextmanager
def layout_attention(pdm):
    """Switch the PDM's layers to the lag-block attention for the duration of a training forward."""
    cfgs = {id(layer.self_attn.config): layer.self_attn.config for layer in pdm.layers}
    saved = {i: c._attn_implementation for i, c in cfgs.items()}
    for c in cfgs.values():
        c._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        for i, c in cfgs.items():
            c._attn_implementation = saved[i]


def _batched(anchors: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    batched = anchors[0].dim() == 3
    return (anchors if batched else [a[None] for a in anchors]), batched


def run_blocks(pdm, blocks: list[torch.Tensor], k: int) -> torch.Tensor:
    """The PDM's layers over k+1 blocks [B, S, H] each (k in-flight depths, then the completed
    rows) in the lag-block layout; returns the raw output of block 0 (the newest rows) [B, S, H]."""
    S = blocks[0].shape[1]
    hidden = torch.cat(blocks, dim=1)  # [B, (k+1)*S, H]
    pos = torch.arange(S, device=hidden.device).repeat(k + 1)[None]
    target = pdm.target[0]
    rotary = target.decoder.rotary_emb
    pe = rotary(hidden, pos, "full_attention") if target._rotary_per_type else rotary(hidden, pos)
    with layout_attention(pdm):
        for layer in pdm.layers:
            out = layer(hidden, attention_mask=None, position_embeddings=pe, position_ids=pos,
                        past_key_values=None, use_cache=False, spd_blocks=(k, S))
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden[:, :S]


def layout_logits(pdm, anchors: list[torch.Tensor], k: int) -> torch.Tensor:
    """Draft logits [S, Vd] ([B, S, Vd]) for every position as the newest of a window of k in-flight tokens.

    anchors: the PDM's anchors from one teacher-forced pass, each [S, H] (h_0 first), or each
    [B, S, H] for B right-padded sequences. An EAGLE-style head (`pdm.cfg.chain`) is laid out
    by `chain_logits` instead.
    """
    if pdm.cfg.chain:
        return chain_logits(pdm, anchors, k)
    return profile_logits(pdm, anchors, tuple(range(k)))


def profile_logits(pdm, anchors: list[torch.Tensor], depths: tuple[int, ...]) -> torch.Tensor:
    """Draft logits for every position as the newest row of a window whose row at offset e (0 the
    newest) sits at depth depths[e] (non-decreasing in e: older rows have passed more stages).

    One node per slot (SPD as published) has depths 0, 1, ..., k-1. A path through a draft tree in
    flight has runs: the rows of one slot share a depth, and nodes not yet in the pipeline (grown
    this cycle, or waiting to enter) are embedding-only rows at depth 0, e.g. (0, 0, 1, 1, 1).
    Under the tree mask every node sees exactly one such path, so these windows cover branching.
    """
    anchors, batched = _batched(anchors)
    m = pdm.cfg.n_types
    blocks = [pdm.project(pdm.type_of_depth[d], anchors) for d in depths] + [pdm.project(m - 1, anchors)]
    logits = pdm.head(run_blocks(pdm, blocks, len(depths)))
    return logits if batched else logits[0]


def chain_logits(pdm, anchors: list[torch.Tensor], k: int) -> torch.Tensor:
    """An EAGLE-style head's draft logits for every position p as a node k-1 levels below a root
    at p-k+1 (the last verified token, embedding-only), its ancestors the drafted tokens between.

    "embed": every in-flight row is type 0 (one block layout). "feedback" unrolls as inference
    runs (EAGLE-3's training-time test): pass j lays out a window of j, where the node at depth
    d >= 1 is FC_fb(its embedding, pass d's output at p-1, its parent); gradients flow through
    the unrolled outputs, so the head learns from its own features.
    """
    anchors, batched = _batched(anchors)
    full = pdm.project(pdm.cfg.n_types - 1, anchors)
    root = pdm.project(0, anchors)
    if pdm.fc_feedback is None:
        out = run_blocks(pdm, [root] * k + [full], k)
    else:
        emb = anchors[0]
        fed: list[torch.Tensor] = []  # fed[d-1]: the rows of nodes at depth d
        for j in range(1, k + 1):
            out = run_blocks(pdm, [*reversed(fed), root, full], j)
            if j < k:  # the next depth's rows: each token's parent is the position before it
                parent = F.pad(out[:, :-1], (0, 0, 1, 0))
                fed.append(pdm.drafted_rows(emb, parent))
    logits = pdm.head(out)
    return logits if batched else logits[0]
