"""SPEED's original regime: a decoder whose `depth` layers are ONE shared block applied in a cycle.

Tokens in flight at different depths all need the same weights, so one tick advances every one of
them by a layer with a single weight read: norms, projections and MLP run on a batch of rows
(one row per in-flight token), and only attention is per row, over that depth's own cache.
Decoding is bound by weight reads, so a tick with k rows costs far less than k ticks of one.

`run_sequential` (token after token, layer after layer) and `run_pipelined` (a software pipeline
across depths) compute the same states; scripts/bench_speed_shared.py times them.

Demo code, not part of the package: Llama-family layers only, used by that script and by
tests/test_speed.py (which imports it from here). The package's SPEED is methods/spd_core.py's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class SharedWeightsDecoder:
    def __init__(self, block, rotary, depth: int, capacity: int = 512):
        """block: an HF Llama-style decoder layer (input_layernorm, self_attn.{q,k,v,o}_proj,
        post_attention_layernorm, mlp); rotary: the model's rotary embedding module."""
        a = block.self_attn
        self.block, self.rotary, self.depth = block, rotary, depth
        self.heads = a.config.num_attention_heads
        self.kv_heads = a.config.num_key_value_heads
        self.head_dim = a.head_dim
        p = block.input_layernorm.weight
        # One K/V cache per depth: the same weights, but depth d's keys come from depth d's inputs.
        self.k = torch.zeros(depth, self.kv_heads, capacity, self.head_dim, dtype=p.dtype, device=p.device)
        self.v = torch.zeros_like(self.k)

    @torch.inference_mode()
    def step(self, h: torch.Tensor, positions: list[int], depths: list[int]) -> torch.Tensor:
        """Advance rows h [B, H] (row b: the token at positions[b], entering layer depths[b]) by one
        application of the shared block, reading its weights once for the whole batch."""
        a, B = self.block.self_attn, h.shape[0]
        x = self.block.input_layernorm(h)
        q = a.q_proj(x).view(B, self.heads, 1, self.head_dim)
        k = a.k_proj(x).view(B, self.kv_heads, 1, self.head_dim)
        v = a.v_proj(x).view(B, self.kv_heads, 1, self.head_dim)
        cos, sin = self.rotary(h, torch.tensor([positions], device=h.device))
        q, k = apply_rotary_pos_emb(q, k, cos[0][:, None], sin[0][:, None])  # [B, 1, 1, hd] after unsqueeze
        out = []
        for b, (pos, d) in enumerate(zip(positions, depths, strict=True)):  # attention: per row
            self.k[d, :, pos], self.v[d, :, pos] = k[b, :, 0], v[b, :, 0]
            out.append(F.scaled_dot_product_attention(q[b : b + 1], self.k[d : d + 1, :, : pos + 1],
                                                      self.v[d : d + 1, :, : pos + 1], enable_gqa=True))
        att = torch.cat(out).reshape(B, self.heads * self.head_dim)
        h = h + a.o_proj(att)
        return h + self.block.mlp(self.block.post_attention_layernorm(h))

    def run_sequential(self, seq: torch.Tensor) -> torch.Tensor:
        """Every token through all `depth` applications, one row at a time: [T, H] -> [T, H]."""
        out = []
        for t in range(seq.shape[0]):
            h = seq[t : t + 1]
            for d in range(self.depth):
                h = self.step(h, [t], [d])
            out.append(h)
        return torch.cat(out)

    def run_pipelined(self, seq: torch.Tensor) -> torch.Tensor:
        """Token t enters at tick t; each tick advances every in-flight token by one depth in one
        batched step (token t at depth d at tick t + d: its depth-d predecessors are done)."""
        T = seq.shape[0]
        state = {t: seq[t : t + 1] for t in range(T)}
        for tick in range(T + self.depth - 1):
            rows = [t for t in range(T) if 0 <= tick - t < self.depth]
            h = self.step(torch.cat([state[t] for t in rows]), rows, [tick - t for t in rows])
            for i, t in enumerate(rows):
                state[t] = h[i : i + 1]
        return torch.cat([state[t] for t in range(T)])
