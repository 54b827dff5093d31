"""Weight-only quantized Linears for the CPU: fewer bytes per decode step, bf16 activations.

A one-row decode step reads every weight once, so on a CPU its matrix time follows the bytes read
(out of cache: fp32 4 bytes a weight, fp16w and bf16 2, int8w 1, int4w 0.5 plus a scale and a
zero per 32). aten ships both kernels; only the functions below touch them, and
tests/test_quantized.py fails the day they go.

- int4w: 4-bit weights in groups of 32 along the input, each with a scale and a minimum (w = q *
  scale + min, q in 0..15): exactly llama.cpp's Q4_1 layout. Our default model IS a Q4_1 GGUF
  de-quantised to fp32, so quantizing its fp32 weights this way recovers the file's own integers,
  scales and minima; the one loss is the kernel's bf16 copy of each scale and zero (fp16 in the
  GGUF). On any other checkpoint it is ordinary 4-bit quantization, a different model.
- int8w: 8-bit weights, one symmetric scale per output row.

Both kernels take bf16 activations (their fp32 and fp16 paths are scalar fallbacks, 20-50x
slower), so everything but the Linears runs in bf16, like the bfloat16 backend.
"""

from __future__ import annotations

import torch
from torch import nn

INT4_GROUP = 32


def int4_kernels_available() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(aten, "_weight_int4pack_mm_for_cpu")


def int8_kernels_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_fits(linear: nn.Linear) -> bool:
    """The packing wants whole groups along the input and output rows in multiples of 16."""
    return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0


def int4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 [N, K] in 0..15, scale [N, K/32], minimum [N, K/32]) in fp32, Q4_1's rule: a group's
    minimum maps to 0 and its maximum to 15. Applied to weights already on such a grid (a Q4_1 GGUF
    de-quantised) it gives back the grid's own values."""
    w = weight.detach().float()
    n, k = w.shape
    groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
    lo = groups.amin(-1)
    scale = (groups.amax(-1) - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((groups - lo[..., None]) / safe[..., None]).round().clamp_(0, 15)
    return q.reshape(n, k).to(torch.int32), scale, lo


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """The fp32 weights the int4 kernel computes with: scale and zero (= min + 8 scale) stored in
    `dtype`, w = (q - 8) * scale + zero."""
    n, k = q.shape
    s, z = scale.to(dtype).float(), (lo + 8 * scale).to(dtype).float()
    return ((q.reshape(n, k // INT4_GROUP, INT4_GROUP) - 8) * s[..., None] + z[..., None]).reshape(n, k)


def on_int4_grid(weight: torch.Tensor) -> bool:
    """Whether `weight` [N, K] already lies on Q4_1's grid (every group of 32 spans q = 0..15 of
    its own scale above its minimum: a Q4_1 tensor de-quantised): int4w then holds it as it is, up
    to the bf16 copy of each scale and zero. Q4_K's 6-bit sub-scales need not reach 0 and 15, so
    its tensors are not recognised."""
    if weight.dim() != 2 or weight.shape[1] % INT4_GROUP:
        return False
    w = weight.float()
    err = (int4_dequantize(*int4_quantize(w), dtype=torch.float32) - w).abs().max()
    return bool(err <= 1e-6 * w.abs().max().clamp(min=1e-30))


def holds_int4_grid(directory, rows: int = 4) -> bool:
    """Whether a model directory's decoder Linears lie on Q4_1's grid: the first `rows` output
    rows of every 2-D projection weight under `.layers.` are checked (groups run along a row, so a
    row holds whole groups); one tensor off the grid (a mixed-precision GGUF's 6-bit ones) is
    enough to say no. Only those rows are read."""
    from pathlib import Path

    from safetensors import safe_open

    checked = 0
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                if ".layers." not in key or not key.endswith("_proj.weight"):
                    continue
                sl = st.get_slice(key)
                if len(sl.get_shape()) != 2 or not sl.get_dtype().startswith("F"):
                    return False
                if not on_int4_grid(sl[:rows]):
                    return False
                checked += 1
    return checked > 0


def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale fp32 [N]): symmetric per output row, w ~ q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / safe[:, None]).round().clamp_(-127, 127).to(torch.int8), scale


def stored_weight(backend: str, linear: nn.Linear, head: bool = False) -> torch.Tensor:
    """The fp32 weights `backend` computes with in place of fp32 `linear`'s (`head`: the model's
    LM head, int8 under int4w; bf16-rounded where int4w leaves a Linear unpacked)."""
    if backend == "int4w" and not head and not int4_fits(linear):
        return linear.weight.detach().to(torch.bfloat16).float()
    if backend == "int4w" and not head:
        return int4_dequantize(*int4_quantize(linear.weight))
    q, scale = int8_quantize(linear.weight)
    return q.float() * scale.to(torch.bfloat16).float()[:, None]


class _QuantizedLinear(nn.Linear):
    """An nn.Linear whose forward uses a quantized copy of `weight`. `weight` itself stays the
    checkpoint's tensor (fingerprints, a draft initialised from the target's head read it); the
    copy is rebuilt from it by `repack`, from its fp32 values when it is packed first."""

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = linear.in_features, linear.out_features
        out.weight, out.bias = linear.weight, linear.bias
        out.repack()
        return out

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.in_features).to(torch.bfloat16)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int4Linear(_QuantizedLinear):
    def repack(self) -> None:
        q, scale, lo = int4_quantize(self.weight)
        zero = lo + 8 * scale
        self.scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.packed = int4_pack(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(int4_mm(self._flat(x), self.packed, self.scales_zeros), x)


class Int8Linear(_QuantizedLinear):
    def repack(self) -> None:
        self.q, scale = int8_quantize(self.weight)
        self.scale = scale.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(torch.ops.aten._weight_int8pack_mm(self._flat(x), self.q, self.scale), x)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """aten's CPU packing of int32 values 0..15 [N, K] (one inner K tile: the CPU kernel's layout)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ the packed weights^T -> [M, N] bf16 (w = (q - 8) * scale + zero per group)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales_zeros)


QUANTIZED = {"int4w": Int4Linear, "int8w": Int8Linear}


def quantize_linears(module: nn.Module, backend: str) -> None:
    """Swap `module`'s CPU Linears for `backend`'s quantized ones, repack those already swapped,
    then cast every other floating parameter to bf16. Buffers (rotary frequencies) stay as loaded,
    as a bf16 load keeps them.

    int4w packs the Linears whose shape allows; a model's LM head (its output embeddings) gets
    int8w instead, as llama.cpp's mixes keep the output layer above 4 bits (our default GGUF's is
    Q8_0): a 4-bit head moves logits by several % of their range."""
    get_head = getattr(module, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            cls = Int8Linear if backend == "int8w" or child is head else Int4Linear
            if isinstance(child, _QuantizedLinear):
                # Repack only from fp32 values (new ones loaded in); after the first packing the
                # weight is bf16, and quantizing that again would leave a Q4 grid.
                if child.weight.dtype == torch.float32:
                    child.repack()
            elif type(child) is nn.Linear and child.weight.device.type == "cpu" \
                    and (cls is not Int4Linear or int4_fits(child)):
                setattr(parent, name, cls.from_linear(child))
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
