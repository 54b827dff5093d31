"""The target model cut into pipeline stages: embedding, n contiguous layer ranges, norm + LM head.

Everything that decodes (autoregressive, SPD, classic speculative decoding, PipeSpec, SPEED) runs
on this one abstraction. It drives a Hugging Face model's own decoder layers, so every family
that transformers implements (Llama, Qwen2/3, Mistral, Gemma 3, ...) keeps its exact maths; we
only replace the cache (static, position-indexed, see kv_cache.py) and build the attention masks.

Hidden-state indices follow HF's convention: h_0 is the embedding output, h_j (1 <= j <= L) is
the raw residual stream after decoder layer j-1, before the final norm.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Sequence
from itertools import pairwise

import torch

from .compact_layer import CompactLlamaLayer, compact_layers, rotary_tables
from .errors import SpdError
from .kv_cache import StaticKVCache
from .tree import DraftTree, ancestor_mask, chunk_tensors


def split_layers(n_layers: int, stages: int | Sequence[int]) -> list[int]:
    """Stage sizes for `stages` (a count or an explicit list); uneven counts put the extra layers first.

    The first stages get the extra layers because the last stage also pays for the LM head.
    """
    if isinstance(stages, int):
        if stages < 1:
            raise SpdError(f"the number of stages must be at least 1 (got {stages})")
        if stages > n_layers:
            raise SpdError(f"{stages} stages requested but the model has only {n_layers} layers")
        base, extra = divmod(n_layers, stages)
        return [base + (1 if s < extra else 0) for s in range(stages)]
    sizes = [int(x) for x in stages]
    if not sizes or any(x < 1 for x in sizes) or sum(sizes) != n_layers:
        raise SpdError(f"stage sizes {sizes} must be positive and sum to the model's {n_layers} layers")
    return sizes


def context_length(config) -> int:
    """The positions a model's config allows (2048 where it names none)."""
    return int(getattr(config, "max_position_embeddings", 2048))


def layer_windows(config) -> list[int | None]:
    """Sliding-window size of each layer (None = full attention), as the HF implementation applies it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types[:n]]
    return [window] * n  # e.g. Mistral: one window for every layer when set


def chunk_mask(start: int, positions: torch.Tensor, visible: torch.Tensor, key_lo: int,
               window: int | None, committed: int | None = None) -> torch.Tensor:
    """Boolean [1, 1, q, k] mask for a chunk in slots start..start+q-1 with its own position ids.

    Keys are slots key_lo..start+q-1. The verified ones (slot < committed, default start) sit at
    position == slot; slots committed..start+q-1 (in-flight rows of a draft tree, then the
    chunk) at `positions` [start - committed + q] (all >= committed). A query sees a key when the
    key's position is not after its own and, in a sliding layer, lies within `window` POSITIONS of
    it; among the rows from `committed` on, only those that `visible` [q, start - committed + q]
    allows (a tree's ancestors).
    """
    committed = start if committed is None else committed
    device = positions.device
    q = visible.shape[0]
    kpos = torch.cat([torch.arange(key_lo, committed, device=device), positions])[None, :]
    qpos = positions[-q:, None]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    allowed[:, committed - key_lo:] &= visible
    return allowed[None, None]


def run_decoder_layers(layers, indices, layer_types, windows, rotary, rotary_per_type: bool, cache: StaticKVCache,
                       hidden: torch.Tensor, start: int, capture: Collection[int] | None = None,
                       positions: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                       committed: int | None = None):
    """Run HF decoder layers `indices` on q tokens in cache slots start..start+q-1 over a StaticKVCache.

    By default token j sits at position start + j and sees every earlier token (plain causal
    decoding). A draft tree's rows run off that line: `committed` (default start) says how many
    slots hold verified tokens at slot == position; `positions` gives the position of every row
    from there on (in-flight rows already cached, then the chunk's q); `visible` [q, that many]
    which of them each chunk row sees (default: the earlier ones and itself). See tree.py.

    Shared by the staged target and the draft module (whose layers are built from the same class).
    `layers` are HF's, or compact_layer's wrappers of them (which take their rotary tables ready).
    """
    q = hidden.shape[1]
    committed = start if committed is None else committed
    if positions is None:
        positions = torch.arange(start, start + q, device=hidden.device)
    if visible is None and q > 1:
        visible = torch.ones(q, q, dtype=torch.bool, device=hidden.device).tril()
    qpos = positions[-q:]
    pos = qpos[None]
    raw, pe, masks, captured = {}, {}, {}, {}
    cache.begin(start, committed, int(qpos.min()))
    # A single query over a cache slice that ends at its own position needs no mask: the slice
    # already is exactly what it may see (the window included). In-flight rows before it do.
    masked = q > 1 or committed < start
    for i in indices:
        kind = layer_types[i]
        compact = isinstance(layers[i], CompactLlamaLayer)  # takes its rotary tables ready
        if kind not in raw:
            raw[kind] = rotary(hidden, pos, kind) if rotary_per_type else rotary(hidden, pos)
        if (kind, compact) not in pe:
            pe[kind, compact] = rotary_tables(*raw[kind]) if compact else raw[kind]
        window = windows[i]
        if masked and window not in masks:
            masks[window] = chunk_mask(start, positions, visible, cache.window_start(i, start), window, committed)
        out = layers[i](
            hidden,
            attention_mask=masks.get(window),
            position_embeddings=pe[kind, compact],
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        hidden = out[0] if isinstance(out, tuple) else out
        if capture is not None and i + 1 in capture:
            captured[i + 1] = hidden
    return hidden if capture is None else (hidden, captured)


class StagedTarget:
    def __init__(self, model, stages: int | Sequence[int] = 1, capacity: int = 256):
        self.model = model
        self.config = model.config
        self.decoder = model.get_decoder()
        self.layers = self.decoder.layers  # HF's (the teacher's hooks and HF's own forward use them)
        self.step_layers = compact_layers(self.layers)  # what the stage executor runs
        self.n_layers = self.config.num_hidden_layers
        self.stage_sizes = split_layers(self.n_layers, stages)
        bounds, lo = [], 0
        for size in self.stage_sizes:
            bounds.append((lo, lo + size))
            lo += size
        self.stage_bounds = bounds
        self.windows = layer_windows(self.config)
        types = getattr(self.config, "layer_types", None) or ["full_attention"] * self.n_layers
        self.layer_types = list(types[: self.n_layers])
        # Gemma 3 keeps one rotary table per layer type; Llama-style models have a single one.
        rotary = self.decoder.rotary_emb
        self._rotary_per_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self.context_length = context_length(self.config)
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.cache = StaticKVCache(
            {i: self.windows[i] for i in range(self.n_layers)}, min(capacity, self.context_length),
            self.context_length,
        )

    @property
    def n_stages(self) -> int:
        return len(self.stage_sizes)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [1, q] -> h_0 [1, q, H] (Gemma's embedding scale included)."""
        return self.decoder.embed_tokens(ids)

    def run_layers(self, lo: int, hi: int, hidden: torch.Tensor, start: int, capture: Collection[int] | None = None,
                   positions: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                   committed: int | None = None):
        """Run layers lo..hi-1 on tokens at positions start..start+q-1, writing their K/V.

        Returns the output hidden state, or (output, {j: h_j}) when `capture` is given: the
        hidden-state indices j in (lo, hi] to keep (the raw residual after layer j-1).
        `positions`, `visible` and `committed` (see run_decoder_layers) run tokens off the plain
        causal line: a draft tree's nodes, over rows of other nodes still in flight.
        """
        return run_decoder_layers(self.step_layers, range(lo, hi), self.layer_types, self.windows,
                                  self.decoder.rotary_emb, self._rotary_per_type, self.cache, hidden, start, capture,
                                  positions, visible, committed)

    def run_stage(self, stage: int, hidden: torch.Tensor, start: int, capture: Collection[int] | None = None):
        lo, hi = self.stage_bounds[stage]
        return self.run_layers(lo, hi, hidden, start, capture)

    def run_stage_chunk(self, stage: int, hidden: torch.Tensor, layout, capture: Collection[int] | None = None):
        """One stage's layers on rows [1, q, H] of draft-tree nodes placed by `layout` (a
        cache_layout.ChunkLayout: after the verified prefix and the in-flight rows the stage holds,
        each row at its position, seeing its ancestors only)."""
        lo, hi = self.stage_bounds[stage]
        positions, visible = chunk_tensors(layout, hidden.device)
        return self.run_layers(lo, hi, hidden, layout.start, capture, positions, visible, layout.committed)

    def compact(self, plan, stage: int | None = None) -> None:
        """Apply a cache_layout.Compaction to every layer (or one stage's): keep the verified rows at
        slot == position, then the surviving in-flight rows; forget the rest."""
        if plan.is_identity:
            return
        layers = None if stage is None else range(*self.stage_bounds[stage])
        self.cache.keep_slots(plan.dst, plan.src, layers)

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """All stages on tokens `ids` [1, q] at positions start.. ; returns the final pre-norm hidden state."""
        return self.run_layers(0, self.n_layers, self.embed(ids), start)

    # -- draft trees ---------------------------------------------------------------------------
    def _tree_layers(self, lo: int, hi: int, hidden: torch.Tensor, start: int, tree: DraftTree,
                     capture: Collection[int] | None = None):
        if len(tree) == 0:  # the root alone is a plain single-token step (no mask needed)
            return self.run_layers(lo, hi, hidden, start, capture)
        if hidden.shape[1] != 1 + len(tree):
            raise ValueError(f"a tree of {len(tree)} nodes needs {1 + len(tree)} rows (got {hidden.shape[1]})")
        positions = torch.tensor(tree.positions(start), device=hidden.device)
        return self.run_layers(lo, hi, hidden, start, capture, positions, ancestor_mask(tree, hidden.device))

    def run_stage_tree(self, stage: int, hidden: torch.Tensor, start: int, tree: DraftTree,
                       capture: Collection[int] | None = None):
        """One stage's layers on the root and a tree's nodes: rows [1, 1+m, H] (row 0 the root).

        The root goes in slot and position `start`, node i in slot start+1+i at position
        start + depth(i); each sees the committed prefix (within each layer's window, counted in
        positions), the root, its ancestors and itself. Afterwards the stage's cache holds all
        1+m rows; `keep_path` keeps the accepted ones.
        """
        lo, hi = self.stage_bounds[stage]
        return self._tree_layers(lo, hi, hidden, start, tree, capture)

    def forward_tree(self, root_token: int, tree: DraftTree, start: int, capture: Collection[int] | None = None):
        """The root (slot/position `start`, not yet cached) and every node of `tree` in ONE pass.

        Returns the final pre-norm hidden states [1, 1+m, H] (row 0 the root, row 1+i node i):
        `logits(h)[0]` is the target's distribution after the root and after each node's path.
        With `capture` (hidden-state indices, 0 the embedding): (h, {j: h_j [1, 1+m, H]}).
        """
        ids = torch.tensor([[root_token, *tree.tokens]], device=self.device)
        h0 = self.embed(ids)
        if capture is None:
            return self._tree_layers(0, self.n_layers, h0, start, tree)
        h, got = self._tree_layers(0, self.n_layers, h0, start, tree, capture)
        if 0 in capture:
            got[0] = h0
        return h, got

    def keep_path(self, start: int, nodes: Sequence[int], stage: int | None = None) -> None:
        """After a tree pass at `start`: keep the root and the accepted `nodes` (a path, in order).

        Their K/V move to slots start+1, start+2, ... (slot == position again) in every layer (or
        one stage's), whose length becomes start + 1 + len(nodes); every other node is forgotten.
        """
        nodes = [int(n) for n in nodes]
        if any(n < 0 for n in nodes) or any(b <= a for a, b in pairwise(nodes)):
            raise ValueError(f"a kept path lists distinct nodes from the root down (got {nodes})")
        layers = None if stage is None else range(*self.stage_bounds[stage])
        self.cache.keep_slots(start + 1, [start + 1 + n for n in nodes], layers)

    def teacher_pass(self, ids: list[int], keep) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """All layers over `ids` from position 0, cache reset: (h_L [1, S, H], {j: h_j [S, H]} for j in keep)."""
        self.reserve(len(ids))
        self.rollback(0)
        h0 = self.embed(torch.tensor([ids], device=self.device))
        h, got = self.run_layers(0, self.n_layers, h0, 0, capture=set(keep))
        got[0] = h0
        return h, {j: got[j][0] for j in keep}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ Gemma-style soft-capping) on raw final hidden states; fp32 out."""
        logits = self.model.lm_head(self.decoder.norm(hidden)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def reserve(self, n_positions: int) -> None:
        """Make room for n_positions tokens, or fail clearly if that exceeds the model's context."""
        try:
            self.cache.ensure_capacity(n_positions)
        except ValueError as exc:
            raise SpdError(str(exc)) from exc

    def rollback(self, length: int, stage: int | None = None) -> None:
        """Forget positions >= length in every layer (or only in one stage's layers)."""
        layers = None if stage is None else range(*self.stage_bounds[stage])
        self.cache.truncate(length, layers)

    def cache_lengths(self) -> list[int]:
        """Length of each stage's cache (its first layer's; all layers of a stage move together)."""
        return [self.cache.lengths[lo] for lo, _ in self.stage_bounds]
