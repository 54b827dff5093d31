"""A compact decoder layer for the Llama family (Llama, Qwen2, Mistral, SmolLM2), gpt-fast style.

A one-row decode step is mostly overhead: of a SmolLM2 layer's time on a CPU, the matrix-vector
products are about half; the rest is HF's layer plumbing (module calls, kwargs, the attention
interface lookup), an fp32 RMSNorm built from eight ops, and rotary from six per tensor. This
layer runs the same weights (the HF layer's own submodules, so the backends' Linears, the
parameters and their names stay as they are) in fewer ops:

- RMSNorm: torch.rms_norm in fp32 (bit-identical to HF's composite there); in other dtypes
  HF's rounding (normalise in fp32, round, then scale), one fused op fewer.
- Rotary: queries and keys rotated together in one pass, with the sign of rotate_half folded
  into a sine table computed once per step for every layer (`rotary_tables`): x*cos +
  swap_halves(x)*sin_signed is what HF computes, op for op on each element.
- Attention: HF's own SDPA function, so its GQA and masking paths, and their rounding, are kept.

fp32 outputs are bit-identical to HF's layer (tests/test_compact_layer.py, every family it
takes). Families with anything else in the layer (Qwen3's q/k norms, Gemma's extra norms and
scaled embeddings) keep HF's layers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# HF layer classes whose forward is exactly: pre-norm attention (q/k/v/o Linears, rotary, SDPA)
# and a pre-norm SiLU-gated MLP, each with a residual.
COMPACT_FAMILIES = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")


class Rotary(NamedTuple):
    """cos and sin [b, 1, q, d] for one step, the first half of sin negated (rotate_half's sign)."""

    cos: torch.Tensor
    sin_signed: torch.Tensor


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> Rotary:
    """HF's (cos, sin) [b, q, d] as the compact layer uses them, once per step for all layers."""
    half = sin.shape[-1] // 2
    return Rotary(cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, None])


def compactable(layer: nn.Module) -> bool:
    """Whether `layer` is one the compact layer computes alike."""
    if type(layer).__name__ not in COMPACT_FAMILIES:
        return False
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    act = getattr(getattr(mlp, "act_fn", None), "__class__", type(None)).__name__
    return (attn is not None and mlp is not None and act == "SiLUActivation"
            and getattr(attn.config, "_attn_implementation", "sdpa") == "sdpa"
            and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")))


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = norm.variance_epsilon
    if x.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), norm.weight, eps)
    return norm.weight * torch.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class CompactLlamaLayer(nn.Module):
    """Wraps an HF Llama-family decoder layer (sharing its submodules) and runs it in fewer ops;
    called as the stage executor calls HF layers (`run_decoder_layers`)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        a = layer.self_attn
        self.head_dim, self.layer_idx = a.head_dim, a.layer_idx
        self.n_heads = a.q_proj.out_features // a.head_dim
        self.n_kv = a.k_proj.out_features // a.head_dim

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings=None, past_key_values=None, **_) -> torch.Tensor:
        a, b, q, d = self.self_attn, hidden.shape[0], hidden.shape[1], self.head_dim
        rot = position_embeddings if isinstance(position_embeddings, Rotary) else rotary_tables(*position_embeddings)
        x = rms_norm(self.input_layernorm, hidden)
        # Queries and keys as one [b, heads + kv heads, q, d] tensor: one rotary pass for both.
        qk = torch.cat((a.q_proj(x), a.k_proj(x)), -1).view(b, q, self.n_heads + self.n_kv, d).transpose(1, 2)
        swapped = qk.view(b, -1, q, 2, d // 2).flip(3).view(b, -1, q, d)
        qk = qk * rot.cos + swapped * rot.sin_signed
        queries, keys = qk[:, : self.n_heads], qk[:, self.n_heads:]
        values = a.v_proj(x).view(b, q, self.n_kv, d).transpose(1, 2)
        if past_key_values is not None:
            keys, values = past_key_values.update(keys, values, self.layer_idx)
        out, _ = sdpa_attention_forward(a, queries, keys, values, attention_mask, scaling=a.scaling)
        hidden = hidden + a.o_proj(out.reshape(b, q, -1))
        x = rms_norm(self.post_attention_layernorm, hidden)
        m = self.mlp
        return hidden + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))


def compact_layers(layers) -> list[nn.Module]:
    """The layers as the stage executor should run them: compact where `compactable`, else HF's."""
    return [CompactLlamaLayer(layer) if compactable(layer) else layer for layer in layers]
