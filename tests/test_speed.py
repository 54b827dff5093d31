"""SPEED as an SPD drafter (early exit of the newest token's stage-0 state): greedy equals AR in
one process and across processes; sampling follows AR; the shared-weights batched step is exact."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from distribution import sampled_vs_exact
from test_distributed import EOS, launch

from spdecode.drafting.drafters import SpeedDrafter
from spdecode.methods.ar import generate_ar
from spdecode.methods.spd import generate_spd
from spdecode.runtime.errors import SpdError
from spdecode.runtime.staged import StagedTarget

PROMPT = [5, 17, 42, 8, 33, 71, 9, 5, 17, 42]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sizes,depth", [([6], 6), ([6], 2), ([3, 3], 3), ([3, 3], 1), ([2, 2, 2], 2),
                                         ([1, 2, 3], 1)])
def test_greedy_equals_ar(family, sizes, depth):
    model = tiny_model(family)
    ref = generate_ar(StagedTarget(model), PROMPT, 40).tokens
    target = StagedTarget(model, sizes)
    gen = generate_spd(target, SpeedDrafter(target, depth), PROMPT, 40)
    assert gen.tokens == ref
    m = gen.metrics
    assert m.method == "speed" and m.new_tokens == 1 + m.drafts_verified
    if sizes == [6] and depth == 6:  # the exit is the last layer: every draft is the target's token
        assert m.alpha == 1.0


def test_depth_must_lie_in_stage_zero():
    target = StagedTarget(tiny_model("llama"), [3, 3])
    with pytest.raises(SpdError, match=r"d must be in 1..3"):
        SpeedDrafter(target, 4)


def test_sampling_follows_ar_distribution():
    model = tiny_model("llama")
    target, prompt = StagedTarget(model, [2, 4]), [5, 6, 7]
    drafter = SpeedDrafter(target, 2)
    tv, noise = sampled_vs_exact(model, prompt, 3, 2000,
                                 lambda params: generate_spd(target, drafter, prompt, 3, params).tokens)
    assert tv < 1.6 * noise, (tv, noise)


def test_distributed_equals_single_process(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    prompts = [PROMPT, [3, 3, 3, 60, 61], [90, 1, 44, 7]]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out = tmp_path / "out.json"
    res = launch(2, ["--model", str(tmp_path / "model"), "--stages", "3,3", "--method", "speed", "--speed-depth", "2",
                     "--requests", str(tmp_path / "req.jsonl"), "--max-new-tokens", "30", "--json-out", str(out),
                     "--timeout", "60"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    target = StagedTarget(model, [3, 3])
    for p, rec in zip(prompts, json.loads(out.read_text()), strict=True):
        single = generate_spd(target, SpeedDrafter(target, 2), p, 30, eos=EOS)
        assert rec["tokens"] == single.tokens == generate_ar(StagedTarget(model), p, 30, eos=EOS).tokens
        assert rec["metrics"]["method"] == "speed-dist"
        assert (rec["metrics"]["cycles"], rec["metrics"]["drafts_accepted"]) == \
            (single.metrics.cycles, single.metrics.drafts_accepted)


def test_shared_weights_batched_step_equals_one_after_the_other():
    """SPEED's regime: two in-flight tokens at different depths of ONE shared block, computed with
    one weight read (a batch of 2), give the same states as running them one after the other.
    The block is demo code in scripts/ (speed_shared.py), not a method of the package."""
    SharedWeightsDecoder = load_script("speed_shared").SharedWeightsDecoder
    model = tiny_model("llama", num_hidden_layers=1)
    dec = SharedWeightsDecoder(model.model.layers[0], model.model.rotary_emb, depth=4)
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(6, model.config.hidden_size, generator=g)
    ref = dec.run_sequential(seq)
    got = dec.run_pipelined(seq)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # And one application of the block is the HF layer itself (run by the staged target).
    one = SharedWeightsDecoder(model.model.layers[0], model.model.rotary_emb, depth=1)
    hf = StagedTarget(model).run_layers(0, 1, seq[None], 0)[0]
    torch.testing.assert_close(one.run_sequential(seq), hf, rtol=1e-4, atol=1e-5)
