"""`spdecode bench`: every method on the same prompts in one invocation, one table, a plot, and
greedy outputs that equal AR's (the command fails otherwise)."""

import json
import subprocess
import sys

import pytest
from conftest import run_cli

from spdecode.bench.report import predicted_tokens_per_cycle

METHODS = ["ar", "sd", "eagle", "pipespec", "speed", "spd"]


@pytest.mark.integration
def test_one_invocation_compares_every_method(tmp_path):
    prompts = tmp_path / "mine.jsonl"  # a user's own prompt file, prompts the drafts never saw
    prompts.write_text("".join(json.dumps({"question_id": i, "turns": [t]}) + "\n" for i, t in enumerate(
        ["List three uses of a paperclip.", "Write a Python function that returns the square of x."])))
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    res = subprocess.run([sys.executable, "-m", "spdecode", "bench", "--method", ",".join(METHODS), "--stages", "2",
                          "--data", str(prompts), "--max-new-tokens", "20", "--drafter", "prompt-lookup",
                          "--chain", "prompt-lookup", "--json-out", str(out), "--plot", str(plot)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert list(summary) == METHODS
    for m in METHODS:
        row = summary[m]["overall"]
        assert row["prompts"] == 2 and row["mismatches"] == 0 and row["speedup_vs_ar"] > 0
        assert set(summary[m]) == {"mine", "overall"}
        for line in res.stdout.splitlines():
            if line.startswith(f"{m} ") and "overall" in line:
                break
        else:
            pytest.fail(f"no overall row for {m} in the table")
    assert plot.stat().st_size > 1000


def test_bad_method_is_one_clear_line(capsys):
    code, err = run_cli(capsys, "bench", "--method", "ar,warp")
    assert code == 2 and "unknown method warp" in err and "Traceback" not in err


def test_predictions_at_the_extremes():
    assert predicted_tokens_per_cycle("ar", None, 1, 4) == 1.0
    assert predicted_tokens_per_cycle("spd", 1.0, 4, 4) == 1.0 and predicted_tokens_per_cycle("spd", 0.0, 4, 4) == 0.25
    assert predicted_tokens_per_cycle("sd", 1.0, 1, 4) == 5.0 and predicted_tokens_per_cycle("sd", 0.0, 1, 4) == 1.0
    assert predicted_tokens_per_cycle("pipespec", 0.0, 1, 4) == 1.0
    assert predicted_tokens_per_cycle("pipespec", 1.0, 1, 4) == 5.0


def test_greedy_identity_is_required_in_fp32_and_reported_in_bf16(capsys):
    """fp32 greedy outputs must equal AR's (exit 1 otherwise); in bf16 a batched verification pass
    may legitimately depart, so the share identical to AR is reported and the run succeeds. A
    method's own dtype (a spec's dtype=) decides which rule applies to it."""
    from spdecode.bench.run import BenchConfig, check_identity

    rows = {"spd": {"mismatches": 3, "checked_against_ar": 12}}
    assert check_identity(BenchConfig(dtype="float32"), rows) == 1
    assert "3 greedy outputs of spd differ" in capsys.readouterr().out
    assert check_identity(BenchConfig(dtype="bfloat16"), rows) == 0
    assert "9 of 12 greedy outputs identical to AR" in capsys.readouterr().out
    assert check_identity(BenchConfig(dtype="float32"), {"spd": {"mismatches": 0, "checked_against_ar": 12}}) == 0
    mixed = {"eagle:dtype=bfloat16": {"mismatches": 5, "checked_against_ar": 12},
             "spd": {"mismatches": 0, "checked_against_ar": 12}}
    dtypes = {"eagle:dtype=bfloat16": "bfloat16", "spd": "float32"}
    assert check_identity(BenchConfig(dtype="float32"), mixed, dtypes) == 0
    assert "7 of 12" in capsys.readouterr().out


def test_method_specs_carry_their_own_options(monkeypatch):
    from spdecode.bench.run import BenchConfig, method_specs
    from spdecode.runtime.errors import SpdError

    specs = method_specs(BenchConfig(method="eagle:budget=16:depth=5,ar,spd:stages=2,sd:drafter=prompt-lookup",
                                     tree_topk=3))
    assert list(specs) == ["ar", "eagle:budget=16:depth=5", "spd:stages=2", "sd:drafter=prompt-lookup"]
    method, opts = specs["eagle:budget=16:depth=5"]
    assert method == "eagle" and opts.tree(method) == (16, 5, 3)
    assert specs["spd:stages=2"][1].stages == 2 and specs["ar"][1].stages == 1  # --stages is the pipeline's
    assert specs["sd:drafter=prompt-lookup"][1].tree("sd") == (0, 4, 3)  # sd's default is a chain
    # The AR sweep: every backend this machine has (the run's own first) x 1 up to every usable core.
    monkeypatch.setattr("spdecode.bench.run.thread_sweep", lambda: [1, 2, 4])
    monkeypatch.setattr("spdecode.bench.run.model_backends", lambda model, device: ["float32", "bfloat16", "fp16w"])
    swept = method_specs(BenchConfig(method="ar,eagle", dtype="bfloat16", ar_sweep=True))
    assert [s for s in swept if s.startswith("ar")] == [
        "ar:threads=1", "ar:threads=2", "ar:threads=4",
        "ar:threads=1:dtype=float32", "ar:threads=2:dtype=float32", "ar:threads=4:dtype=float32",
        "ar:threads=1:dtype=fp16w", "ar:threads=2:dtype=fp16w", "ar:threads=4:dtype=fp16w"]
    assert swept["ar:threads=2:dtype=float32"][1].dtype == "float32" and swept["ar:threads=1"][1].threads == 1
    assert swept["eagle"][1].dtype == "bfloat16"  # every method on the run's backend: ratios like for like
    aliased = method_specs(BenchConfig(method="ar:backend=fp16w,eagle:dtype=bf16"))
    assert aliased["ar:backend=fp16w"][1].dtype == "fp16w" and aliased["eagle:dtype=bf16"][1].dtype == "bfloat16"
    for bad in ("eagle:budget", "eagle:wings=2", "eagle:budget=many", "warp", "ar:threads=0", "ar,ar",
                "ar:backend=int3", "ar:backend=auto"):
        with pytest.raises(SpdError):
            method_specs(BenchConfig(method=bad))
    # Values may hold colons and commas; a shared --draft reaches only the methods that take one.
    odd = method_specs(BenchConfig(method="ar,sd:drafter=early-exit:8:budget=8,pipespec:chain=prompt-lookup,"
                                          "early-exit:20,eagle", draft="heads/h"))
    assert list(odd) == ["ar", "sd:drafter=early-exit:8:budget=8", "pipespec:chain=prompt-lookup,early-exit:20",
                         "eagle"]
    assert odd["sd:drafter=early-exit:8:budget=8"][1].drafter == "early-exit:8"
    assert odd["pipespec:chain=prompt-lookup,early-exit:20"][1].chain == "prompt-lookup,early-exit:20"
    assert odd["ar"][1].draft is None and odd["eagle"][1].draft == "heads/h"


def test_the_fastest_ar_configuration_is_the_baseline():
    from spdecode.bench.report import summarise

    def rec(method, tok_s):
        return {"method": method, "dataset": "d", "new_tokens": 11, "cycles": 10, "drafts_verified": 0,
                "drafts_accepted": 0, "n_stages": 1, "decode_s": 10 / tok_s, "decode_tok_s": tok_s,
                "phase_s": {}}

    records = [rec("ar:threads=1", 10.0), rec("ar:threads=2", 20.0), rec("eagle", 30.0)]
    summary = summarise(records, ["ar:threads=1", "ar:threads=2", "eagle"], ["d"])
    assert summary["eagle"]["overall"]["speedup_vs_ar"] == pytest.approx(1.5)
    assert summary["eagle"]["overall"]["baseline"] == "ar:threads=2"
    assert summary["ar:threads=1"]["overall"]["speedup_vs_ar"] == pytest.approx(0.5)
