"""Integration tests on the real default model, SmolLM2-135M-Instruct in fp32 (converted once, cached)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli

from spdecode.methods.ar import generate_ar
from spdecode.runtime.generation import eos_ids
from spdecode.runtime.staged import StagedTarget

pytestmark = pytest.mark.integration

PROMPTS = ["def fib(n):", "The three primary colors are", "Question: what is 12 * 7?\nAnswer:"]


def spdecode(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "spdecode", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("stages", [1, 4])
def test_greedy_equals_hf_generate(default_model, stages):
    model, tok = default_model
    target = StagedTarget(model, stages)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert generate_ar(target, ids, 32, eos=eos_ids(model, tok)).tokens == ref, prompt


def test_cli_json_matches_hf_generate(default_model):
    model, tok = default_model
    res = spdecode("generate", "--method", "ar", "--model", "smollm2-135m", "--prompt", "def fib(n):",
                   "--max-new-tokens", "32", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    ids = tok("def fib(n):").input_ids
    ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert out["tokens"] == ref
    assert out["metrics"]["new_tokens"] == len(ref) and out["text"].strip()


def test_cli_streams_chat_answer_and_summary():
    res = spdecode("generate", "--method", "ar", "--prompt", "What is the capital of France?", "--chat",
                   "--max-new-tokens", "24", "--stages", "3")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert "new tokens" in res.stderr and "tok/s" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hi", "--stages", "0"], "stages"),
    (["--prompt", "hi", "--stages", "31"], "30 layers"),
    (["--prompt", "hi", "--stages", "10,10"], "sum"),
    (["--prompt", "   "], "empty"),
    (["--prompt", "hi", "--model", "/no/such/model"], "does not exist"),
    (["--prompt", "hi", "--model", "no-such-org/no-such-model"], "alias"),
    (["--prompt", "hi", "--dtype", "int3"], "unknown backend 'int3'"),
    (["--prompt", "hi", "--backend", "int3"], "unknown backend 'int3'"),
    (["--prompt", "hi", "--device", "tpu"], "device"),
    (["--prompt", "hi " * 9000], "context"),
    (["--prompt", "hi", "--top-p", "0"], "top-p"),
])
def test_cli_bad_input_is_one_clear_line(args, message, capsys):
    # In this process: a fresh interpreter per case cost 4-8 s each, a minute of the suite.
    code, err = run_cli(capsys, "generate", "--method", "ar", *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err
