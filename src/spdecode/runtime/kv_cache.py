"""A static, position-indexed KV cache (gpt-fast style) that Hugging Face attention layers write into.

The K/V of the token at position p live in slot p of its layer's buffer. Rolling back is just
lowering a layer's length: stale slots beyond it are never read and get overwritten by the next
token at that position. No copies, no concatenation.

The one exception is a draft tree's pass (tree.py): its nodes fill the slots after the prefix in
node order while their positions follow the tree; `keep_slots` then moves the accepted path's
K/V to slot == position and forgets the rest.

HF attention modules call `cache.update(key, value, layer_idx)` and attend over what it returns.
They do not pass positions, so the stage executor announces where the current chunk starts with
`begin(start)` before running the layers.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, windows: dict[int, int | None], capacity: int, max_positions: int):
        """windows: layer index -> sliding-window size (None for full attention), for the layers held."""
        self.windows = dict(windows)
        self.capacity = capacity
        self.max_positions = max_positions
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.lengths = dict.fromkeys(windows, 0)
        self._start = self._committed = self._first = 0

    def begin(self, start: int, committed: int | None = None, first_position: int | None = None) -> None:
        """The next update of every layer writes a chunk at slots start..; slots < `committed`
        (default start) hold verified tokens at slot == position, and the chunk's earliest
        position is `first_position` (default start): what sliding windows are counted from."""
        self._start = start
        self._committed = start if committed is None else committed
        self._first = start if first_position is None else first_position

    def ensure_capacity(self, n: int) -> None:
        if n > self.max_positions:
            raise ValueError(f"sequence of {n} positions exceeds the model's context of {self.max_positions}")
        if n <= self.capacity:
            return
        new_cap = min(self.max_positions, max(n, 2 * self.capacity))
        for bufs in (self.k, self.v):
            for i, old in bufs.items():
                grown = self._empty(old, (*old.shape[:2], new_cap, old.shape[3]))
                grown[:, :, : old.shape[2]] = old
                bufs[i] = grown
        self.capacity = new_cap

    @staticmethod
    def _empty(like: torch.Tensor, shape) -> torch.Tensor:
        # Buffers are ordinary tensors even when first touched under inference_mode, so that the
        # same cache also serves no_grad code (the training teacher, eval-draft) afterwards.
        with torch.inference_mode(False):
            return like.new_empty(shape)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        start, end = self._start, self._start + key.shape[2]
        if start != self.lengths[layer_idx]:
            # Positions must stay contiguous per layer; anything else is a schedule bug that
            # would silently attend to stale or missing entries.
            raise RuntimeError(
                f"layer {layer_idx}: writing position {start} but the cache holds {self.lengths[layer_idx]}"
            )
        if end > self.capacity:
            self.ensure_capacity(end)
        if layer_idx not in self.k:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.k[layer_idx] = self._empty(key, shape)
            self.v[layer_idx] = self._empty(value, shape[:3] + (value.shape[3],))
        kbuf, vbuf = self.k[layer_idx], self.v[layer_idx]
        kbuf[:, :, start:end] = key
        vbuf[:, :, start:end] = value
        self.lengths[layer_idx] = end
        lo = self.window_start(layer_idx, start)
        return kbuf[:, :, lo:end], vbuf[:, :, lo:end]

    def window_start(self, layer_idx: int, start: int) -> int:
        """First slot any query of the chunk begun at `start` can see in this layer: within the
        window of its earliest position among the verified slots, and every in-flight row after
        them (their positions are masked one by one)."""
        w = self.windows[layer_idx]
        if w is None:
            return 0
        committed, first = (self._committed, self._first) if start == self._start else (start, start)
        return min(committed, max(0, first - w + 1))

    def keep_slots(self, dst: int, src, layers=None) -> None:
        """Move the K/V in slots `src` (each >= its destination) to dst, dst+1, ... and make the
        length dst + len(src) in the given layers (default: all held): how a draft tree's accepted
        path becomes an ordinary, position-indexed prefix, with the surviving in-flight rows after
        it. Everything else is forgotten."""
        src = list(src)
        end = dst + len(src)
        # Slots already in place (a chain's accepted prefix) need no copy.
        first = next((j for j, s in enumerate(src) if s != dst + j), len(src))
        for i in self.windows if layers is None else layers:
            if src and self.lengths[i] <= max(src):
                raise RuntimeError(f"layer {i}: keeping slot {max(src)} but the cache holds {self.lengths[i]}")
            if first < len(src):
                idx = torch.tensor(src[first:], device=self.k[i].device)
                # Indexing copies the source rows before they are written, so overlaps are safe.
                self.k[i][:, :, dst + first:end] = self.k[i].index_select(2, idx)
                self.v[i][:, :, dst + first:end] = self.v[i].index_select(2, idx)
            self.lengths[i] = min(self.lengths[i], end)

    def truncate(self, length: int, layers=None) -> None:
        """Roll back: keep positions [0, length) in the given layers (default: all held)."""
        for i in self.windows if layers is None else layers:
            if self.lengths[i] > length:
                self.lengths[i] = length

    def reset(self) -> None:
        self.truncate(0)

    # HF code may ask a cache object for its length.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths.get(layer_idx, 0)
