"""`--method auto`: the profile, the simulator's ranking, the confirmation runs, and one line why.

The verdict is cached in the profile under what constrained it (a backend the user named,
whether a pipeline of processes may be chosen). A cached verdict is used after a start-up check:
one AR step of the verdict's best AR, timed now, must be within 20 % of the profile's (checked
twice before the profile is thrown away: one noisy timing is not a new machine).
"""

from __future__ import annotations

import sys
import time

from ..runtime.errors import SpdError
from .candidates import Candidate, grid, predict
from .confirm import confirm, decide
from .profile import (
    STALE_STEP,
    load_profile,
    off_by,
    path_of,
    profile_key,
    profile_path,
    save_profile,
    step_seconds,
    verdict_key,
)

CONFIRM_DRAFTING = 3  # drafting configurations confirmed by running them (the simulator's best)
CONFIRM_AR = 2  # and AR configurations


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_profile(model_name: str, device: str = "cpu", log=stderr, full: bool = False, why: str = "") -> dict:
    """The stored profile when its key matches, else a new one measured now (with a message)."""
    from .tune import tune

    key = profile_key(model_name, device)
    profile, reason = (None, why) if why else load_profile(model_name, device, key)
    if profile is not None:
        return profile
    log(f"auto: {reason}: measuring this machine's profile for --method auto (once, about 1-3 minutes; cached in "
        f"{profile_path(model_name, device, key)})")
    profile = tune(model_name, device, full=full, log=log)
    save_profile(profile)
    log(f"auto: profile measured in {profile['tune_s']:.0f} s")
    return profile


def add_backend(profile: dict, model_name: str, backend: str, device: str, log=stderr) -> None:
    """Time a backend the user named that the probe had pruned."""
    from ..plan.costs import CONTEXTS
    from ..plan.measure import measure
    from ..runtime.machine import usable_cores
    from .tune import QUICK_ROWS, drafts_for_auto, tune_threads

    log(f"auto: timing --backend {backend}, which the profile had left out")
    data = measure(model_name, backend, device, threads=tune_threads(usable_cores(), False), rows=QUICK_ROWS,
                   contexts=CONTEXTS, drafts=drafts_for_auto(model_name), link=False, concurrent=False,
                   log=lambda m: None)
    if profile.get("link"):
        data["link"] = profile["link"]
    profile["costs"][backend] = data
    save_profile(profile)


def ar_step_now(model_name: str, backend: str, device: str, threads: int, tries: int = 2,
                context: int = 128):
    """Whole AR steps at `context` timed now as the profile timed them (plan.costs.ar_step_time),
    one median of 9 per try (a generator: the caller stops when one matches)."""
    import torch

    from ..plan.costs import ar_step_time, prime
    from ..runtime.models import load_model
    from ..runtime.staged import StagedTarget

    model, _ = load_model(model_name, backend, device, tokenizer=False)
    target = StagedTarget(model, 1, capacity=context + 2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prime(target, context)
        for _ in range(tries):
            yield ar_step_time(target, context, 9)
    finally:
        torch.set_num_threads(before)


def stale(profile: dict, model_name: str, device: str, ar: Candidate) -> str:
    """"" when an AR step timed now matches the profile's, else why the profile is stale."""
    want = step_seconds(profile, ar.backend, ar.threads)
    if want is None:
        return "the profile has no AR step to check against"
    for got in ar_step_now(model_name, ar.backend, device, ar.threads):
        if off_by(got, want) <= STALE_STEP:
            return ""
    return (f"an AR step takes {1e3 * got:.1f} ms here now, the profile says {1e3 * want:.1f} ms (more than "
            f"{100 * STALE_STEP:.0f} % off: another machine, or a busy one)")


def choose(model_name: str, device: str = "cpu", backend: str | None = None, distributed: bool = True,
           log=stderr) -> dict:
    """The verdict (the choice and why, see `verdict`) for this machine, cached in its profile."""
    from ..runtime.models import model_backends

    if backend is not None and backend not in (offered := model_backends(model_name, device)):
        raise SpdError(f"auto does not measure backend {backend} for {model_name} on {device}; choose from "
                       f"{', '.join(offered)}")
    profile = ensure_profile(model_name, device, log)
    vkey = verdict_key(backend, distributed)
    cached = profile.get("verdicts", {}).get(vkey)
    if cached:
        why = stale(profile, model_name, device, Candidate.from_dict(cached["ar"]))
        if not why:
            log(f"auto: {cached['line']} (cached in {path_of(profile)})")
            return cached
        profile = ensure_profile(model_name, device, log, why=why)
    if backend is not None and backend not in profile["costs"]:
        add_backend(profile, model_name, backend, device, log)
    result = verdict(profile, model_name, device, backend, distributed, log)
    profile.setdefault("verdicts", {})[vkey] = result
    save_profile(profile)
    log(f"auto: {result['line']}")
    return result


def verdict(profile: dict, model_name: str, device: str, backend: str | None, distributed: bool, log) -> dict:
    from ..runtime.machine import usable_cores

    cands = grid(profile, model_name, usable_cores(), backend, distributed)
    predicted = {c: predict(profile, c) for c in cands}
    ranked = sorted(cands, key=lambda c: -predicted[c]["tok_s"])
    drafting = [c for c in ranked if c.method != "ar"][:CONFIRM_DRAFTING]
    ars = [c for c in ranked if c.method == "ar"][:CONFIRM_AR]
    log("auto: predicted " + ", ".join(f"{c.label} {predicted[c]['tok_s']:.1f}" for c in ranked[:5])
        + f" tok/s; confirming {len(drafting) + len(ars)} by running them")
    measured = confirm(ars + drafting, model_name, device)
    choice, ar, margin = decide(measured)
    m, a = measured[choice], measured[ar]
    ratio = m.median / a.median
    break_even = m.cycle_s * a.median if choice.method != "ar" else None  # tokens per cycle that only match AR
    if choice == ar:
        rival = max((c for c in measured if c.method != "ar"), key=lambda c: measured[c].median, default=None)
        why = (f"no drafting configuration beat it by more than the {100 * margin:.0f} % run-to-run spread (best: "
               f"{rival.label}, {measured[rival].median / a.median:.2f}x)" if rival else
               "the best AR; no drafting configuration here (auto drafts with the bundled drafts of a model alias)")
    else:
        why = f"{ratio:.2f}x the best AR, {ar.label} at {a.median:.1f} tok/s, past the {100 * margin:.0f} % spread"
    line = (f"{choice.label}: {m.median:.1f} tok/s confirmed, {predicted[choice]['tok_s']:.1f} predicted; {why}")
    return {"choice": choice.as_dict(), "spec": choice.spec, "label": choice.label, "ar": ar.as_dict(),
            "ar_label": ar.label, "tok_s": m.median, "ar_tok_s": a.median, "speedup": ratio, "margin": margin,
            "break_even": break_even, "line": line,
            # what the online guard gets (methods/guard.py; a pipeline of processes has none)
            "guard": None if choice.distributed else break_even,
            "predicted": {c.label: predicted[c]["tok_s"] for c in ranked},
            "confirmed": {c.label: {"tok_s": v.tok_s, "median": v.median, "spread": v.spread,
                                    "tokens_per_cycle": v.tokens_per_cycle, "cycle_s": v.cycle_s}
                          for c, v in measured.items()},
            "decided_at": time.time()}
