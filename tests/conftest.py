"""Shared fixtures: tiny random-weight models built from configs, and the real default model."""

from __future__ import annotations

import os

# Tests never reach for a model hub: "a hub id while offline" is exercised as such, with no
# connection attempt (set before transformers / huggingface_hub read it at import).
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

TINY_CONFIGS = {
    "llama": dict(model_type="llama", **TINY),
    "qwen2": dict(model_type="qwen2", **TINY),
    "qwen3": dict(model_type="qwen3", head_dim=8, **TINY),
    "mistral": dict(model_type="mistral", sliding_window=5, **TINY),  # one window for all layers
    # A window of 5 is far shorter than the sequences in the tests, so sliding layers really slide.
    "gemma3": dict(model_type="gemma3_text", head_dim=8, sliding_window=5, query_pre_attn_scalar=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, **TINY),
}
FAMILIES = list(TINY_CONFIGS)


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the checks it covers must come first."""
    import spdecode.runtime.models

    def load_model(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr(spdecode.runtime.models, "load_model", load_model)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    kw = dict(TINY_CONFIGS[family])
    kw.update(overrides)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    # Random init gives near-uniform logits; scaling the head sharpens them so greedy decoding
    # is not decided by float noise and sampled outputs are varied but not uniform.
    if not config.tie_word_embeddings:
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def default_model():
    from spdecode.runtime.models import load_model

    return load_model("smollm2-135m", "float32", "cpu")


@pytest.fixture(scope="session")
def ar_reference(default_model):
    """fn(prompt, max_new_tokens, chat=False): the default model's greedy AR tokens for a prompt as
    `spdecode generate --method ar --json` gives them (its encoding, its EOS, its threads), made in
    this process once per prompt: the CLI runs under test compare against it without an AR
    subprocess each (4-5 s of interpreter start-up; test_default_model checks the CLI's AR)."""
    from spdecode.methods.ar import generate_ar
    from spdecode.runtime.generation import eos_ids
    from spdecode.runtime.machine import usable_cores
    from spdecode.runtime.prompts import encode_prompt
    from spdecode.runtime.staged import StagedTarget

    model, tok = default_model
    made: dict[tuple[str, int, bool], list[int]] = {}

    def tokens(prompt: str, max_new_tokens: int, chat: bool = False) -> list[int]:
        key = (prompt, max_new_tokens, chat)
        if key not in made:
            before = torch.get_num_threads()
            torch.set_num_threads(usable_cores())
            try:
                made[key] = generate_ar(StagedTarget(model), encode_prompt(tok, prompt, chat), max_new_tokens,
                                        eos=eos_ids(model, tok)).tokens
            finally:
                torch.set_num_threads(before)
        return made[key]

    return tokens


def train_tiny_pdm(model, stage_sizes, prompts, out_dir, layers=1):
    """A PDM trained a little on the model's own greedy text, so that drafts are sometimes right."""
    from spdecode.drafting.pdm import new_pdm
    from spdecode.methods.ar import generate_ar
    from spdecode.runtime.models import weights_fingerprint
    from spdecode.runtime.staged import StagedTarget
    from spdecode.training.features import TeacherFeatures
    from spdecode.training.loop import TrainSettings, train

    examples = []
    for p in prompts:
        out = generate_ar(StagedTarget(model), p, 40).tokens
        examples.append((p + out, [False] * len(p) + [True] * len(out)))
    target = StagedTarget(model, stage_sizes)
    pdm = new_pdm(target, "tiny", weights_fingerprint(model), num_layers=layers)
    teacher = TeacherFeatures(target, pdm.cfg.anchors + [target.n_layers], None, "fp")
    settings = TrainSettings(epochs=8, lr=3e-3, warmup=2, batch_tokens=200, val_every=1000, save_every=1000)
    train(pdm, teacher, examples, [], out_dir, settings, log=lambda *_: None)
    return pdm


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of `spdecode ARGV` run in this process: the same main `python -m
    spdecode` runs, without a fresh interpreter's 4-5 s (refusals checked this way)."""
    from spdecode.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # what argparse refuses ends here, as it ends the command
        code = exc.code
    return code, capsys.readouterr().err
