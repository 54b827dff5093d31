"""Weight backends: how every Linear of every model we run (target stages, LM head, PDMs, eagle's
head, SD's draft models) computes, chosen once per run.

Every speculative method rests on a pass over several rows costing little more than one row.
Which number format makes that true depends on the CPU, so the backend is a run-wide choice:

- float32 (alias fp32): fp32 weights and activations, MKL's GEMM.
- bfloat16 (bf16): bf16 weights and activations; fast for several rows only where oneDNN has
  avx512_bf16 or AMX (elsewhere a bf16 GEMM costs about rows x a one-row GEMV).
- fp16w: fp16 weights, fp32 activations and accumulation, through FBGEMM's packed small-row GEMM
  (shipped inside torch); the same model as float32 with every Linear weight rounded to fp16.
  Its row-count dependence is at fp32 rounding level.
- int4w, int8w: 4-bit group-32 (Q4_1's layout) or 8-bit per-row weights, bf16 activations, through
  aten's weight-only CPU kernels (quantized.py); the fewest bytes per one-row step. int4w holds a
  Q4_1 GGUF's own weights (our default model's); on other checkpoints both are lossy quantizations.
- float16 (fp16): fp16 weights and activations (for GPUs).
- auto: measured per machine (`backend_probe.choose_backend`).

A backend name travels through the library where a dtype name used to (`--dtype` is an alias of
`--backend`): `activation_dtype` is what the model's tensors and activations are in, and
`apply_backend` swaps the Linears of a loaded module where the backend needs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpdError
from .quantized import QUANTIZED, int4_kernels_available, int8_kernels_available, quantize_linears

ACTIVATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                     "fp16w": torch.float32, "int4w": torch.bfloat16, "int8w": torch.bfloat16}
# Backends computing with a packed copy of the weights: they load in fp32 and pack from those values
# (int4w must see the exact de-quantised values to recover a Q4 grid); no gradient flows through
# their kernels, so they are for inference only.
PACKED = ("fp16w", *QUANTIZED)
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
AUTO = "auto"
CHOICES = (*ACTIVATION_DTYPES, *ALIASES, AUTO)


def canonical(name: str) -> str:
    """The backend's canonical name ("fp32" -> "float32"); "auto" stays "auto"; unknown names fail."""
    name = ALIASES.get(name, name)
    if name != AUTO and name not in ACTIVATION_DTYPES:
        raise SpdError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    return name


def activation_dtype(backend: str) -> torch.dtype:
    """The dtype of a model's non-Linear tensors and of its activations under `backend`."""
    return ACTIVATION_DTYPES[canonical(backend)]


def load_dtype(backend: str) -> torch.dtype:
    """The dtype to load a checkpoint in before `apply_backend` (fp32 for the packed backends)."""
    backend = canonical(backend)
    return torch.float32 if backend in PACKED else ACTIVATION_DTYPES[backend]


def measured(name: str, where: str) -> str:
    """`name` as a canonical backend that a model can be loaded in: auto, a measurement, must have
    been resolved (backend_probe.choose_backend, or --backend auto for the whole run) before `where`."""
    name = canonical(name)
    if name == AUTO:
        raise SpdError(f"{where} needs a measured backend, not auto: resolve it first (backend_probe.choose_backend, "
                       "or --backend auto for the whole run)")
    return name


def device_backends(device: str) -> list[str]:
    """The backends worth trying on `device`: on a CPU float32, bfloat16 and fp16w (where FBGEMM's
    fp16 GEMM is present); on a GPU float32, bfloat16 and float16. The quantized backends
    (int4w, int8w) change the model on any checkpoint not already on their grid, so they are
    chosen by name, never by a measurement."""
    if device != "cpu":
        return ["float32", "bfloat16", "float16"]
    return ["float32", "bfloat16"] + (["fp16w"] if fbgemm_fp16_available() else [])


def quantized_available(backend: str) -> bool:
    return {"int4w": int4_kernels_available, "int8w": int8_kernels_available}[backend]()


# -- FBGEMM's packed fp16-weight GEMM -------------------------------------------------------------
# Reached through torch's quantized ops, the entry points of the (deprecated) torch.ao dynamic fp16
# Linear. Only the two functions below touch them; tests/test_backends.py fails the day they go, and
# PackedFp16Linear falls back to an fp32 GEMM over the same fp16-rounded weights meanwhile.

def fbgemm_fp16_available() -> bool:
    ops = getattr(torch.ops, "quantized", None)
    try:
        return ops is not None and hasattr(ops, "linear_prepack_fp16") and hasattr(ops, "linear_dynamic_fp16") \
            and "fbgemm" in torch.backends.quantized.supported_engines
    except RuntimeError:
        return False


def fbgemm_fp16_pack(weight: torch.Tensor, bias: torch.Tensor | None):
    """An opaque packed fp16 copy of `weight` (the bias stays fp32), for `fbgemm_fp16_linear`."""
    return torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(),
                                                   None if bias is None else bias.detach().float())


def fbgemm_fp16_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """x [..., in] (fp32) @ packed^T (+ bias): fp32 accumulation, every thread torch has."""
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


class PackedFp16Linear(nn.Linear):
    """An nn.Linear computing with its weight rounded to fp16 (fp32 activations and accumulation).

    `weight` keeps the original fp32 values, so everything that reads a model's weights (weight
    fingerprints, a PDM initialised from the target's head) sees the checkpoint; the computation
    uses a packed fp16 copy through FBGEMM, or, where that is missing, an fp32 GEMM over the
    fp16-rounded weight (the same numbers, slower).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_fbgemm: bool | None = None) -> PackedFp16Linear:
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = linear.in_features, linear.out_features
        out.weight, out.bias = linear.weight, linear.bias
        out.repack(use_fbgemm)
        return out

    def repack(self, use_fbgemm: bool | None = None) -> None:
        """Rebuild the fp16 copy from `weight` (after loading new values into it)."""
        self.use_fbgemm = fbgemm_fp16_available() if use_fbgemm is None else use_fbgemm
        if self.weight.dtype != torch.float32:
            raise SpdError(f"fp16w needs a float32 model, got {self.weight.dtype} weights")
        if self.use_fbgemm:
            self.packed, self.rounded = fbgemm_fp16_pack(self.weight, self.bias), None
        else:
            self.packed, self.rounded = None, self.weight.detach().half().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return fbgemm_fp16_linear(x, self.packed)
        return F.linear(x, self.rounded, self.bias)


def apply_backend(module: nn.Module, backend: str) -> nn.Module:
    """Make `module`'s Linears compute as `backend` does, in place (its tensors must already be in
    `activation_dtype(backend)`); records the backend as `module.weight_backend`. Only fp16w swaps
    modules; the others compute in their dtype as loaded. A module already converted is repacked;
    Linears still on the meta device (another pipeline rank's layers) are left as they are.
    int4w and int8w take a module loaded in `load_dtype` (fp32), quantize its Linears and cast
    the rest to bf16."""
    backend = canonical(backend)
    if backend in QUANTIZED:
        if any(p.device.type not in ("cpu", "meta") for p in module.parameters()):
            raise SpdError(f"the {backend} backend runs on the CPU (aten's weight-only kernels)")
        if not quantized_available(backend):
            raise SpdError(f"this torch ({torch.__version__}) lacks the {backend} kernels")
        quantize_linears(module, backend)
    elif backend == "fp16w":
        if any(p.device.type not in ("cpu", "meta") for p in module.parameters()):
            raise SpdError("the fp16w backend runs on the CPU (FBGEMM); on a GPU use --backend float16")
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, PackedFp16Linear):
                    child.repack()
                elif type(child) is nn.Linear and child.weight.device.type == "cpu":
                    setattr(parent, name, PackedFp16Linear.from_linear(child))
    module.weight_backend = backend
    return module


def backend_of(module: nn.Module) -> str:
    """The backend `module` was loaded with (its activation dtype's name where none was recorded)."""
    recorded = getattr(module, "weight_backend", None)
    if recorded:
        return recorded
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    return {v: k for k, v in ACTIVATION_DTYPES.items() if k in ("float32", "bfloat16", "float16")}.get(dtype, "float32")
