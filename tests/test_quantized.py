"""Weight-only quantized backends (runtime/quantized.py): the aten kernels they rest on are there
(this fails the day torch drops them); int4w recovers a Q4_1 grid's own integers, scales and minima
from its de-quantised fp32 weights; each quantized Linear computes what its de-quantised weights
compute; a loaded model keeps the checkpoint's identity; the divergence reference holds the
weights the backend computes with."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from spdecode.bench.divergence import reference_model
from spdecode.methods.ar import generate_ar
from spdecode.runtime.backends import apply_backend, backend_of, load_dtype
from spdecode.runtime.models import weights_fingerprint
from spdecode.runtime.quantized import (
    Int4Linear,
    Int8Linear,
    int4_dequantize,
    int4_kernels_available,
    int4_quantize,
    int8_kernels_available,
    stored_weight,
)
from spdecode.runtime.staged import StagedTarget


def test_the_weight_only_kernels_torch_ships_are_there():
    """If this fails, torch renamed or dropped aten's CPU weight-only kernels: int4w and int8w
    cannot load (a clear error says so); find their new entry points (or torchao's)."""
    assert int4_kernels_available() and int8_kernels_available()


def q4_1_weights(n=64, k=96, seed=0):
    """What a Q4_1 GGUF de-quantises to: per group of 32, q in 0..15 (0 and 15 both used, as
    ggml's quantizer maps a group's min and max to them), d and m stored in fp16."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (torch.randn(n, k // 32, 1, generator=g) * 0.05).half().float()
    return (q * d + m).reshape(n, k), q.reshape(n, k), d[..., 0], m[..., 0]


def test_int4_quantize_recovers_a_q4_1_grid_exactly():
    w, q, d, m = q4_1_weights()
    got_q, scale, lo = int4_quantize(w)
    assert torch.equal(got_q, q.to(torch.int32)) and torch.equal(lo, m)
    assert torch.allclose(scale, d, rtol=1e-6, atol=0)
    assert torch.equal(int4_dequantize(got_q, scale, lo, torch.float32), w)


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_a_quantized_linear_computes_with_its_dequantized_weights(cls):
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 64, bias=True)
    with torch.no_grad():
        dense.weight.copy_(q4_1_weights()[0])
    layer = cls.from_linear(dense)
    x = torch.randn(1, 9, 96)
    got = layer(x)
    backend = "int4w" if cls is Int4Linear else "int8w"
    want = F.linear(x.bfloat16().float(), stored_weight(backend, dense), dense.bias)
    assert got.shape == (1, 9, 64) and got.dtype == torch.bfloat16
    # bf16 output rounding (2^-8 relative) is the only difference allowed; a wrong zero point
    # (w = q * scale, or q - 8 without the zero) is off by whole scales.
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    if cls is Int4Linear:  # a wrong zero point (the group minimum forgotten) fails that tolerance
        q, scale, _ = int4_quantize(dense.weight)
        wrong = F.linear(x, (q.reshape(64, 3, 32) * scale[..., None]).reshape(64, 96), dense.bias)
        assert not torch.allclose(got.float(), wrong, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("backend", ["int4w", "int8w"])
def test_a_model_loaded_quantized_keeps_its_identity_and_decodes(backend):
    model = tiny_model("llama")
    before = weights_fingerprint(model)
    assert load_dtype(backend) == torch.float32
    apply_backend(model, backend)
    head = model.get_output_embeddings()
    layers = [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(head, Int8Linear) and layers
    assert all(isinstance(m, Int4Linear if backend == "int4w" else Int8Linear) for m in layers)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert backend_of(model) == backend and weights_fingerprint(model) == before
    out = generate_ar(StagedTarget(model), [5, 9, 13], 12).tokens
    assert len(out) == 12


def test_the_divergence_reference_holds_what_int4w_computes_with(tmp_path):
    """The reference (fp32 arithmetic over the backend's weights) and the int4w model itself give
    logits equal up to bf16 arithmetic; the plain fp32 model is farther away than that."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    ref = reference_model(str(tmp_path / "m"), "int4w")
    fp32 = tiny_model("llama")
    quant = apply_backend(tiny_model("llama"), "int4w")
    ids = torch.tensor([[5, 9, 13, 21, 40, 2, 7]])
    with torch.inference_mode():
        got = quant(ids).logits.float()
        near = (ref(ids).logits - got).abs().max()
        far = (fp32(ids).logits - got).abs().max()
    assert near < far / 2


def on_int4_grid_layers(model) -> None:
    """Snap a model's decoder Linears onto Q4_1's grid, as a Q4_1 GGUF de-quantised lies."""
    with torch.no_grad():
        for m in model.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(int4_dequantize(*int4_quantize(m.weight), dtype=torch.float32))


def test_int4w_is_offered_only_for_a_checkpoint_already_on_its_grid(tmp_path):
    """A Q4_1-style checkpoint (our aliases) gets int4w among the backends auto and --ar-sweep
    measure; a plain fp32 one does not (there int4w would be a lossy quantization)."""
    from spdecode.runtime.models import model_backends

    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path / "plain")
    on_grid = tiny_model("llama")
    on_int4_grid_layers(on_grid)
    on_grid.save_pretrained(tmp_path / "grid")
    assert "int4w" not in model_backends(str(tmp_path / "plain"))
    assert model_backends(str(tmp_path / "grid"))[-1] == "int4w"


@pytest.mark.parametrize("backend", ["fp16w", "int4w", "int8w"])
def test_training_refuses_a_packed_backend(tmp_path, backend):
    """No gradient flows through packed kernels: train says so before loading anything."""
    from spdecode.runtime.errors import SpdError
    from spdecode.training.commands import TrainConfig, run_train

    with pytest.raises(SpdError, match=f"{backend} is an inference backend"):
        run_train(TrainConfig(out=str(tmp_path / "d"), dtype=backend))


def test_a_tied_head_is_quantized_once_as_int8_and_the_lookup_stays_a_bf16_embedding():
    model = tiny_model("llama", tie_word_embeddings=True)
    emb = model.model.embed_tokens.weight.detach().clone()
    apply_backend(model, "int4w")
    head = model.get_output_embeddings()
    assert isinstance(head, Int8Linear) and head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens(torch.tensor([[3, 7]]))[0], emb[[3, 7]].bfloat16())
    x = torch.randn(1, 2, emb.shape[1])
    want = F.linear(x.bfloat16().float(), stored_weight("int8w", _linear(emb)))
    assert torch.allclose(head(x).float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def _linear(weight):
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def test_a_draft_on_int4w_keeps_its_head_8_bit():
    from spdecode.drafting.pdm import new_pdm

    model = apply_backend(tiny_model("llama"), "int4w")
    target = StagedTarget(model, [3, 3])
    pdm = apply_backend(new_pdm(target, "tiny", weights_fingerprint(model)), "int4w")
    assert isinstance(pdm.lm_head, Int8Linear)
    assert any(isinstance(m, Int4Linear) for m in pdm.layers.modules())


def test_one_tensor_off_the_grid_withholds_int4w(tmp_path):
    from spdecode.runtime.quantized import holds_int4_grid

    model = tiny_model("llama")
    on_int4_grid_layers(model)
    model.save_pretrained(tmp_path / "grid")
    assert holds_int4_grid(tmp_path / "grid")
    with torch.no_grad():
        # One weight of a middle layer's key projection moved off its group's grid (a shift of a
        # whole tensor would stay on a grid: the minimum moves with it).
        w = model.model.layers[2].self_attn.k_proj.weight
        w[0, 5] += 0.3 * (w[0, :32].max() - w[0, :32].min()) / 15
    model.save_pretrained(tmp_path / "mixed")
    assert not holds_int4_grid(tmp_path / "mixed")
