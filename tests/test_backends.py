"""Weight backends (runtime/backends.py): fp16w computes what an fp32 model with fp16-rounded Linear
weights computes, row for row; every method on it equals AR on it; every drafter shares the target's
backend; the FBGEMM entry points it rests on are there (this fails the day torch drops them), and
the fallback decodes alike without them; `auto` is measured once and cached, re-measured when its key
changes or its file is unreadable; thread counts follow the usable cores."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from spdecode.drafting.pdm import load_pdm, new_pdm
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.methods.ar import generate_ar
from spdecode.methods.spd import generate_spd
from spdecode.methods.spd_core import TreeShape
from spdecode.runtime import backend_probe, machine
from spdecode.runtime.backends import (
    PackedFp16Linear,
    activation_dtype,
    apply_backend,
    backend_of,
    canonical,
    fbgemm_fp16_available,
)
from spdecode.runtime.errors import SpdError
from spdecode.runtime.models import weights_fingerprint
from spdecode.runtime.staged import StagedTarget


def fp16_rounded(model):
    """The same model in plain fp32 with every Linear weight rounded to fp16: what fp16w holds. A
    head tied to the embedding gets its own rounded copy: fp16w leaves the embedding lookup exact."""
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.weight = torch.nn.Parameter(m.weight.detach().half().float(), requires_grad=False)
    return model


def test_the_fbgemm_fp16_gemm_torch_ships_is_there():
    """The packed fp16 GEMM is reached through torch's quantized ops (the deprecated torch.ao dynamic
    fp16 Linear's entry points). If this fails, torch dropped them: fp16w falls back to an fp32 GEMM
    over the rounded weights (tested below) and loses its speed; find FBGEMM's new entry point."""
    assert fbgemm_fp16_available()
    assert hasattr(torch.ops.quantized, "linear_prepack_fp16") and hasattr(torch.ops.quantized, "linear_dynamic_fp16")


@pytest.mark.parametrize("use_fbgemm", [True, False])
def test_a_packed_linear_is_the_fp16_rounded_linear_row_for_row(use_fbgemm):
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 160, bias=True)
    packed = PackedFp16Linear.from_linear(dense, use_fbgemm=use_fbgemm)
    x = torch.randn(1, 9, 96)
    want = F.linear(x, dense.weight.half().float(), dense.bias)
    got = packed(x)
    assert got.shape == (1, 9, 160) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    # Row-count independence: the first row alone gives what it gives among nine (fp32 accumulation).
    assert torch.allclose(packed(x[:, :1]), got[:, :1], rtol=1e-6, atol=1e-6)
    assert torch.equal(packed.weight, dense.weight)  # the checkpoint's values stay readable
    # A deliberately wrong backend (bf16 weights) is told apart by the same tolerance.
    assert not torch.allclose(F.linear(x, dense.weight.bfloat16().float(), dense.bias), want, rtol=1e-5, atol=1e-5)


def test_fp16w_swaps_every_linear_and_keeps_the_weights_identity():
    model = tiny_model("qwen2")  # Qwen2's q/k/v carry biases
    before = weights_fingerprint(model)
    apply_backend(model, "fp16w")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, PackedFp16Linear) for m in linears)
    assert backend_of(model) == "fp16w" and weights_fingerprint(model) == before


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fp16w_decodes_as_the_fp32_model_with_fp16_rounded_weights(family):
    prompt = [5, 17, 42, 8, 33, 71, 9, 5, 17]
    rounded, packed = fp16_rounded(tiny_model(family)), apply_backend(tiny_model(family), "fp16w")
    assert generate_ar(StagedTarget(packed), prompt, 40).tokens == generate_ar(StagedTarget(rounded), prompt, 40).tokens

    def logits(model):
        with torch.inference_mode():
            return model(torch.tensor([prompt])).logits

    assert torch.allclose(logits(packed), logits(rounded), rtol=1e-5, atol=1e-5)
    # The rounding is visible, so the agreement above says something: the unrounded model is further off.
    assert not torch.allclose(logits(tiny_model(family)), logits(rounded), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_tree_method_on_fp16w_equals_ar_on_fp16w(family, tmp_path):
    """Trees verified in one batched pass and SPD's pipeline, drafted by a PDM that computes on the
    target's backend: the tokens are fp16w AR's (fp32 accumulation rounds alike for any row count)."""
    model = apply_backend(tiny_model(family), "fp16w")
    prompt = [5, 17, 42, 8, 33, 71, 9, 5, 17]
    want = generate_ar(StagedTarget(model), prompt, 40).tokens
    for stages, shape in [(1, TreeShape(8, 3, 4)), (2, TreeShape(8, 2, 4)), (3, TreeShape(1, 1, 1))]:
        target = StagedTarget(model, stages)
        torch.manual_seed(0)
        new_pdm(target, "tiny", weights_fingerprint(model), anchors=None if stages > 1 else [0, 3, 6],
                chain="" if stages > 1 else "feedback").save(tmp_path / f"d{stages}")
        pdm = load_pdm(tmp_path / f"d{stages}", target, weights_fingerprint(model))
        assert backend_of(pdm) == "fp16w"
        assert all(isinstance(m, PackedFp16Linear) for m in pdm.modules() if isinstance(m, torch.nn.Linear))
        assert generate_spd(target, PdmTreeDrafter(pdm), prompt, 40, shape=shape).tokens == want


def test_fp16w_without_fbgemm_still_decodes_alike(monkeypatch):
    prompt = [5, 17, 42, 8, 33, 71, 9, 5, 17]
    want = generate_ar(StagedTarget(apply_backend(tiny_model("llama"), "fp16w")), prompt, 30).tokens
    monkeypatch.setattr("spdecode.runtime.backends.fbgemm_fp16_available", lambda: False)
    model = apply_backend(tiny_model("llama"), "fp16w")
    assert all(m.packed is None for m in model.modules() if isinstance(m, PackedFp16Linear))
    assert generate_ar(StagedTarget(model), prompt, 30).tokens == want


def test_backend_names_and_aliases():
    assert canonical("fp32") == "float32" and canonical("bf16") == "bfloat16" and canonical("fp16w") == "fp16w"
    assert activation_dtype("fp16w") == torch.float32 and activation_dtype("bf16") == torch.bfloat16
    with pytest.raises(SpdError, match="unknown backend"):
        canonical("int3")
    from spdecode.cli import build_parser
    from spdecode.cli.options import resolve_backend

    for flag in ("--backend", "--dtype"):
        args = build_parser().parse_args(["generate", "--prompt", "x", flag, "bf16"])
        assert args.dtype == "bf16"
    with pytest.raises(SpdError, match="unknown backend 'int3'"):
        resolve_backend(build_parser().parse_args(["generate", "--prompt", "x", "--backend", "int3"]))
    args = build_parser().parse_args(["bench", "--backend", "fp32"])
    resolve_backend(args)
    assert args.dtype == "float32"  # canonical before anything reads it (cost files, records)


def test_the_usable_cores_follow_the_cgroup_quota(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert machine.cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert machine.cgroup_cpu_limit(tmp_path) is None
    assert machine.cgroup_cpu_limit(tmp_path / "absent") is None
    monkeypatch.setattr(machine, "cgroup_cpu_limit", lambda: 3)
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert machine.usable_cores() == 3
    assert machine.threads_per_rank(2) == 1 and machine.threads_per_rank(1) == 3
    assert machine.thread_sweep(2) == [1, 2] and machine.thread_sweep(6) == [1, 2, 4, 6]
    assert machine.thread_sweep(1) == [1] and machine.thread_sweep(8) == [1, 2, 4, 8]


def test_auto_is_measured_once_cached_and_measured_again_when_stale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPDECODE_CACHE", str(tmp_path))
    calls = []

    def fake_measure(model, device, threads, backends=None, log=None):
        calls.append(threads)
        return {"float32": {1: 0.030, 9: 0.080}, "bfloat16": {1: 0.040, 9: 0.045}, "fp16w": {1: 0.028, 9: 0.060}}

    monkeypatch.setattr(backend_probe, "measure_backends", fake_measure)
    monkeypatch.setattr(backend_probe, "probe_key", lambda model, device, threads: f"{model}|{device}|{threads}")
    assert backend_probe.choose_backend("m", "cpu", 2) == "bfloat16"  # 85 ms against 88 and 110
    assert backend_probe.choose_backend("m", "cpu", 2) == "bfloat16" and calls == [2]  # cached
    assert backend_probe.choose_backend("m", "cpu", 1) == "bfloat16" and calls == [2, 1]  # another key
    backend_probe.probe_file().write_text("{not json")
    assert backend_probe.choose_backend("m", "cpu", 2) == "bfloat16" and calls == [2, 1, 2]
    assert "unreadable" in capsys.readouterr().err
    assert json.loads(backend_probe.probe_file().read_text())["m|cpu|2"]["choice"] == "bfloat16"


def test_a_probe_key_names_the_machine_and_the_weights(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    key = json.loads(backend_probe.probe_key(str(tmp_path / "m"), "cpu", 2))
    assert key["threads"] == 2 and key["weights"] and key["machine"]["cpu"] and "torch" in key
    assert key["machine"]["usable_cores"] == machine.usable_cores()
    # The backends it chose among: a release that offers another (int4w on a Q4 checkpoint) measures again.
    assert key["backends"][:2] == ["float32", "bfloat16"] and "int4w" not in key["backends"]


def test_probe_times_every_backend_on_a_tiny_model(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    times = backend_probe.measure_backends(str(tmp_path / "m"), "cpu", 1, ["float32", "fp16w"])
    assert set(times) == {"float32", "fp16w"} and all(set(t) == {1, 9} and min(t.values()) > 0
                                                       for t in times.values())
