"""eagle on the real default model (fp32) with the bundled head: token-identical to AR, from the
command line with no extra flags, and the head actually drafts (several tokens per target pass)."""

import json

import pytest
from conftest import run_cli
from test_default_model import spdecode

pytestmark = pytest.mark.integration

PROMPT = "Write a Python function that checks whether a number is prime."


def test_bundled_head_runs_eagle_with_no_extra_flags(ar_reference):
    eagle = spdecode("generate", "--chat", "--prompt", PROMPT, "--method", "eagle", "--max-new-tokens", "64",
                     "--json")
    assert eagle.returncode == 0, eagle.stderr
    e = json.loads(eagle.stdout)
    assert e["tokens"] == ar_reference(PROMPT, 64, chat=True)
    m = e["metrics"]
    assert m["method"] == "eagle" and e["stages"] == [30]
    assert m["tokens_per_cycle"] > 1.5  # a trained head: several tokens per target pass on code
    assert m["accepted_per_depth"][0] > 0 and len(m["alpha_per_depth"]) == len(m["verified_per_depth"])


def test_eagle_streams_text_and_a_summary_with_per_depth_acceptance():
    res = spdecode("generate", "--chat", "--prompt", "Name three colours.", "--method", "eagle",
                   "--max-new-tokens", "24")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() and "[eagle]" in res.stderr and "acceptance per depth" in res.stderr


def test_an_spd_draft_is_not_a_head(capsys):
    code, err = run_cli(capsys, "generate", "--prompt", "hi", "--method", "eagle", "--draft",
                        "src/spdecode/drafts/smollm2-135m-n2")
    assert code == 2 and "--eagle" in err and "Traceback" not in err
