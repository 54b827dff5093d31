"""SPD on the real default model (fp32): token-identical to AR for n in {2, 3, 4}."""

import json

import pytest
from oracles import ReferenceDrafter
from test_default_model import spdecode

from spdecode.drafting.pdm import new_pdm
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.methods.ar import generate_ar
from spdecode.methods.spd import generate_spd
from spdecode.methods.spd_core import TreeShape
from spdecode.runtime.generation import eos_ids
from spdecode.runtime.models import weights_fingerprint
from spdecode.runtime.staged import StagedTarget

pytestmark = pytest.mark.integration

PROMPTS = ["Write a limerick about a cat who codes.", "How many legs do three spiders have?"]


@pytest.fixture(scope="module")
def chats(default_model):
    model, tok = default_model
    eos = eos_ids(model, tok)
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        out.append((ids, generate_ar(StagedTarget(model), ids, 24, eos=eos).tokens))
    return out


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("drafter", ["untrained-pdm", "oracle", "half-right"])
def test_spd_equals_ar_on_default_model(default_model, chats, n, drafter):
    model, tok = default_model
    target = StagedTarget(model, n)
    for i, (ids, ref) in enumerate(chats):
        if drafter == "untrained-pdm":
            d = PdmTreeDrafter(new_pdm(target, "smollm2-135m", weights_fingerprint(model)))
        else:
            d = ReferenceDrafter(ids, ref, model.config.vocab_size, 1.0 if drafter == "oracle" else 0.5, seed=i)
        gen = generate_spd(target, d, ids, 24, eos=eos_ids(model, tok))
        assert gen.tokens == ref, (drafter, n, PROMPTS[i])
        if drafter == "oracle":
            assert gen.metrics.alpha == 1.0 and gen.metrics.cycles == len(ref) - 1 + n - 1


@pytest.mark.parametrize("n", [1, 2, 4])
def test_spd_over_trees_equals_ar_with_the_bundled_draft(default_model, chats, n):
    """Trees of the real model's drafts (the bundled PDM for n = 2 and 4, eagle's head at n = 1)."""
    from spdecode.drafting.build import make_eagle_drafter, make_pipeline_drafter

    model, tok = default_model
    target = StagedTarget(model, {1: 1, 2: [16, 14], 4: [8, 8, 7, 7]}[n])
    fp = weights_fingerprint(model)
    d = make_eagle_drafter(target, "smollm2-135m", fp) if n == 1 else \
        make_pipeline_drafter("spd", target, "smollm2-135m", fp)
    for ids, ref in chats:
        gen = generate_spd(target, d, ids, 24, eos=eos_ids(model, tok), shape=TreeShape(8, 3, 4))
        assert gen.tokens == ref
        assert gen.metrics.drafts_accepted > 0


def test_cli_spd_json_equals_ar_and_warns_without_draft(ar_reference):
    # No draft is bundled for 3 stages: an untrained PDM, with a warning. One node per slot, where
    # every token after the first settles exactly one draft (a tree's walk may settle several).
    spd = spdecode("generate", "--prompt", "def fib(n):", "--method", "spd", "--stages", "3",
                   "--max-new-tokens", "16", "--json", "--tree-budget", "1")
    assert spd.returncode == 0, spd.stderr
    s = json.loads(spd.stdout)
    assert s["tokens"] == ar_reference("def fib(n):", 16)
    m = s["metrics"]
    assert m["method"] == "spd" and m["n_stages"] == 3 and m["new_tokens"] == 1 + m["drafts_verified"]
    assert "untrained PDM" in spd.stderr


@pytest.mark.parametrize("n, sizes, budget", [(2, [13, 17], None), (2, [16, 14], 1), (4, [8, 8, 7, 7], None)])
def test_bundled_drafts_load_with_no_extra_flags(n, sizes, budget, ar_reference):
    """spd's default is a draft tree: at n = 2 the bundled tree-ready draft (its split), with one
    node per slot the published draft; n = 4 has only the published draft, which drafts trees too."""
    prompt = "Write a Python function that checks whether a number is prime."
    extra = [] if budget is None else ["--tree-budget", str(budget)]
    spd = spdecode("generate", "--chat", "--prompt", prompt, "--method", "spd", "--stages", str(n),
                   "--max-new-tokens", "48", "--json", *extra)
    assert spd.returncode == 0, spd.stderr
    s = json.loads(spd.stdout)
    assert "untrained" not in spd.stderr and s["stages"] == sizes
    assert s["tokens"] == ar_reference(prompt, 48, chat=True)
    assert s["metrics"]["drafts_accepted"] > 0  # a trained draft, unlike an untrained one, gets some right


def test_cli_rejects_a_draft_for_another_model(tmp_path, default_model):
    model, _ = default_model
    pdm = new_pdm(StagedTarget(model, 2), "other-model", "0000000000000000")
    pdm.save(tmp_path / "draft")
    res = spdecode("generate", "--prompt", "hi", "--method", "spd", "--stages", "2", "--draft", str(tmp_path / "draft"))
    assert res.returncode == 2 and "trained for other-model" in res.stderr and "Traceback" not in res.stderr
    res = spdecode("generate", "--prompt", "hi", "--method", "spd", "--stages", "3", "--draft", str(tmp_path / "draft"))
    assert res.returncode == 2 and "error:" in res.stderr


def test_cli_spd_over_trees_equals_ar_in_one_process_and_distributed(ar_reference):
    prompt = "Name three primary colours."
    trees = ["--method", "spd", "--stages", "2", "--tree-budget", "8", "--tree-depth", "3", "--tree-topk", "4"]
    one = spdecode("generate", "--chat", "--prompt", prompt, "--max-new-tokens", "24", "--json", *trees)
    dist = spdecode("generate", "--chat", "--prompt", prompt, "--max-new-tokens", "24", "--json", "--distributed",
                    *trees)
    for res in (one, dist):
        assert res.returncode == 0, res.stderr[-3000:]
    want = ar_reference(prompt, 24, chat=True)
    for res in (one, dist):
        out = json.loads(res.stdout)
        m = out["metrics"]
        assert out["tokens"] == want and m["nodes_entered"] > m["cycles"]  # several nodes per slot
        assert m["verified_per_depth"] is not None
