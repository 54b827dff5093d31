"""--method auto: the profile is used only under its own key and while the machine matches it, the
grid and its predictions, the rule that leaves AR, and the command line around it."""

import json

import pytest

import spdecode.auto.choose as choose_mod
import spdecode.auto.profile as profile_mod
import spdecode.auto.tune as tune_mod
from spdecode.auto.candidates import Candidate, grid, predict
from spdecode.auto.confirm import MIN_MARGIN, Measured, decide
from spdecode.auto.profile import load_profile, new_profile, profile_key, save_profile, step_seconds
from spdecode.cli import build_parser, main
from spdecode.plan.planner import SHIPPED

MODEL = "smollm2-135m"
BACKENDS = ("float32", "bfloat16", "fp16w")


def shipped_costs() -> dict:
    return {b: json.loads((SHIPPED / f"{MODEL}-{b}-cpu-2core.json").read_text()) for b in BACKENDS}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Profiles in a fresh directory (the models stay in the shared cache)."""
    monkeypatch.setattr(profile_mod, "profiles_dir", lambda: tmp_path / "profiles")
    return tmp_path


def test_a_profile_is_used_only_under_its_own_key(cache):
    key = {"model": "m", "device": "cpu", "cpu": "X", "flags": ["avx2"], "torch": "2.13.0", "drafts": {"d": "1"}}
    profile, why = load_profile("m", "cpu", key)
    assert profile is None and "no machine profile" in why
    save_profile(new_profile(key, {"float32": {}}, {}, None, False, 1.0))
    assert load_profile("m", "cpu", key)[0] is not None
    for changed in ({"flags": ["avx2", "avx512f"]}, {"drafts": {"d": "2"}}, {"torch": "2.14.0"}):
        profile, why = load_profile("m", "cpu", {**key, **changed})
        assert profile is None and f"{next(iter(changed))} changed since the machine profile" in why, why
    capped = {**key, "flags": ["avx2"], "env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}  # its own file: both kept
    save_profile(new_profile(capped, {"float32": {}}, {}, None, False, 1.0))
    assert load_profile("m", "cpu", key)[0] is not None and load_profile("m", "cpu", capped)[0] is not None
    path = profile_mod.profile_path("m", "cpu", key)
    # Under the same key, one an older spdecode measured (it timed the parts another way).
    path.write_text(json.dumps(new_profile(key, {"float32": {}}, {}, None, False, 1.0) | {"version": 1}))
    profile, why = load_profile("m", "cpu", key)
    assert profile is None and f"is version 1, and this spdecode measures version {profile_mod.VERSION}" in why
    path.write_text('{"version": 1, "costs": {"float32"')
    profile, why = load_profile("m", "cpu", key)
    assert profile is None and "unreadable" in why


def fake_tune(calls):
    def tune(model_name, device="cpu", full=False, keep=None, log=None):
        calls.append(model_name)
        return new_profile(profile_key(model_name, device), shipped_costs(), {}, None, full, 0.1)
    return tune


def fake_confirm(speeds):
    def confirm(cands, model_name, device="cpu", rounds=3, tokens=48):
        return {c: Measured([speeds.get(c.method, 10.0) * f for f in (0.99, 1.0, 1.01)], 0.05, 1.9) for c in cands}
    return confirm


def test_auto_measures_once_then_trusts_the_profile_until_an_ar_step_disagrees(cache, monkeypatch):
    calls, logged = [], []
    monkeypatch.setattr(tune_mod, "tune", fake_tune(calls))
    monkeypatch.setattr(choose_mod, "confirm", fake_confirm({"ar": 30.0, "eagle": 36.0, "spd": 20.0}))
    first = choose_mod.choose(MODEL, log=logged.append)
    assert calls == [MODEL] and "no machine profile" in logged[0]
    assert first["choice"]["method"] == "eagle" and first["guard"] > 1.0  # eagle's break-even: above one token
    ar = Candidate.from_dict(first["ar"])
    stored = json.loads(profile_mod.profile_path(MODEL, "cpu", profile_key(MODEL, "cpu")).read_text())
    step = step_seconds(stored, ar.backend, ar.threads)
    monkeypatch.setattr(choose_mod, "ar_step_now", lambda *a, **k: iter([step * 1.1] * 2))
    again = choose_mod.choose(MODEL, log=logged.append)
    assert calls == [MODEL] and again["choice"] == first["choice"] and "cached" in logged[-1]
    monkeypatch.setattr(choose_mod, "ar_step_now", lambda *a, **k: iter([step * 1.5] * 2))
    choose_mod.choose(MODEL, log=logged.append)
    assert calls == [MODEL, MODEL] and any("more than 20 % off" in m for m in logged)


def test_auto_stays_with_ar_inside_the_noise_and_leaves_it_past_it():
    ar, eagle = Candidate("ar", "fp16w", 2), Candidate("eagle", "fp16w", 2, tree=(8, 3, 4), draft="x")
    noisy = {ar: Measured([30.0, 31.0, 33.0], 0.03, 1.0), eagle: Measured([32.0, 32.5, 33.0], 0.05, 1.9)}
    assert decide(noisy)[0] == ar  # 1.05x, inside AR's 10 % spread
    quiet = {ar: Measured([30.0, 30.1, 30.2], 0.03, 1.0), eagle: Measured([32.0, 32.1, 32.2], 0.05, 1.9)}
    choice, best_ar, margin = decide(quiet)
    assert choice == eagle and best_ar == ar and margin == MIN_MARGIN
    slower = {ar: Measured([30.0, 30.1, 30.2], 0.03, 1.0), eagle: Measured([25.0, 25.0, 25.0], 0.05, 1.9)}
    assert decide(slower)[0] == ar


def test_the_grid_is_small_and_the_simulator_ranks_drafting_by_its_acceptance(monkeypatch):
    import spdecode.auto.candidates as cand_mod

    costs = shipped_costs()
    profile = {"costs": costs, "link": costs["fp16w"]["link"]}
    cands = grid(profile, MODEL, cores=2)
    assert len(cands) == 24 and len({c.spec + str(c.distributed) for c in cands}) == len(cands)  # as the README
    assert {(c.backend, c.threads) for c in cands if c.method == "ar"} == {(b, t) for b in BACKENDS for t in (1, 2)}
    assert {c.method for c in cands} == {"ar", "eagle", "spd"} and any(c.distributed for c in cands)
    assert {c.backend for c in grid(profile, MODEL, 2, backend="fp16w")} == {"fp16w"}
    assert not any(c.distributed for c in grid(profile, MODEL, 2, distributed=False))
    assert not any(c.distributed for c in grid({"costs": costs, "link": None}, MODEL, 1))  # no link timed
    ar = max(predict(profile, c)["tok_s"] for c in cands if c.method == "ar")
    for acceptance, faster in ((0.0, False), (1.0, True)):
        monkeypatch.setattr(cand_mod, "shipped_acceptance", lambda d, a=acceptance: [a] * 4)
        eagle = [predict(profile, c)["tok_s"] for c in cands if c.method == "eagle"]
        assert (max(eagle) > ar) == faster, (acceptance, max(eagle), ar)


def test_auto_is_the_default_and_refuses_what_it_decides(capsys):
    for command in (["generate", "--prompt", "x"], ["serve"]):
        args = build_parser().parse_args(command)
        assert args.method == "auto" and args.dtype is None
    code = main(["generate", "--prompt", "hi", "--stages", "2", "--tree-budget", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "--method auto chooses --stages, --tree-budget" in err, err


def test_generate_auto_measures_once_says_why_and_reports_its_choice(cache, tmp_path, capsys, monkeypatch):
    from serving import tiny_chat_model

    tiny_chat_model(tmp_path / "tiny")
    argv = ["generate", "--model", str(tmp_path / "tiny"), "--prompt", "Hello", "--max-new-tokens", "4", "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "measuring this machine's profile" in err and "auto: ar (" in err, err
    first = json.loads(out)
    assert first["auto"]["choice"]["method"] == "ar" and first["method"] == "ar"
    assert first["backend"] == first["auto"]["choice"]["backend"]
    # A tiny model's millisecond step is too noisy for the 20 % start-up check (tested above with
    # the real model's profile): here the machine is taken to match its profile.
    ar = Candidate.from_dict(first["auto"]["ar"])
    tiny = str(tmp_path / "tiny")
    profile = json.loads(profile_mod.profile_path(tiny, "cpu", profile_key(tiny, "cpu")).read_text())
    monkeypatch.setattr(choose_mod, "ar_step_now", lambda *a, **k: iter([step_seconds(profile, ar.backend,
                                                                                       ar.threads)]))
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "measuring" not in err and "cached" in err, err
    assert json.loads(out)["auto"]["choice"] == first["auto"]["choice"]


def test_auto_refuses_bad_input_before_measuring(cache, monkeypatch, capsys):
    monkeypatch.setattr(tune_mod, "tune", lambda *a, **k: pytest.fail("measured before checking the input"))
    for argv, message in ((["--prompt", "  "], "empty"), (["--prompt", "hi", "--device", "tpu"], "device"),
                          (["--prompt", "hi", "--model", "/no/such/model"], "does not exist")):
        assert main(["generate", *argv]) == 2
        assert message in capsys.readouterr().err


def test_bench_runs_what_auto_chose_with_its_guard(monkeypatch, capsys):
    from types import SimpleNamespace

    from spdecode.cli.commands import resolve_auto_spec

    eagle = Candidate("eagle", "fp16w", 2, tree=(8, 3, 4), draft="smollm2-135m-eagle")
    asked = []
    monkeypatch.setattr(choose_mod, "choose", lambda model, device, backend: asked.append(backend) or {
        "choice": eagle.as_dict(), "spec": eagle.spec, "guard": 1.75})
    args = SimpleNamespace(method="ar,auto:backend=fp16w", model=MODEL, device="cpu", distributed=False)
    resolve_auto_spec(args)
    assert asked == ["fp16w"] and args.method == f"ar,{eagle.spec}:guard=1.7500" and not args.distributed
    pipeline = Candidate("spd", "fp16w", 1, 2, True, (8, 2, 4), "smollm2-135m-n2-tree")
    monkeypatch.setattr(choose_mod, "choose", lambda *a: {"choice": pipeline.as_dict(), "spec": pipeline.spec,
                                                          "guard": None})
    args = SimpleNamespace(method="auto,ar", model=MODEL, device="cpu", distributed=False)
    resolve_auto_spec(args)
    assert args.method == f"{pipeline.spec},ar" and args.distributed


def test_the_probe_keeps_a_backend_best_at_one_row_and_prunes_one_behind_at_both():
    """int4w's case: cheapest one-row GEMM, dearest nine-row one; it can win AR, so it is
    measured. A backend behind by more than PRUNE at one row and at the sum cannot win anything."""
    probe = {"fp16w": {"1": 80e-6, "9": 150e-6}, "bfloat16": {"1": 105e-6, "9": 115e-6},
             "int4w": {"1": 30e-6, "9": 300e-6}, "float32": {"1": 130e-6, "9": 240e-6}}
    assert tune_mod.survivors(probe) == ["fp16w", "bfloat16", "int4w"]

