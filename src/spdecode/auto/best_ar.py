"""`python -m spdecode.auto.best_ar --model M`: the options of the best AR configuration --method auto
confirmed on this machine (`--backend B --threads T`), for `make run`'s side-by-side AR run;
`--backend auto` where no verdict is cached yet."""

from __future__ import annotations

import argparse


def best_ar_options(model_name: str, device: str = "cpu") -> list[str]:
    from .profile import load_profile, profile_key, verdict_key

    profile, _ = load_profile(model_name, device, profile_key(model_name, device))
    verdict = (profile or {}).get("verdicts", {}).get(verdict_key(None, True))
    if not verdict:
        return ["--backend", "auto"]
    return ["--backend", verdict["ar"]["backend"], "--threads", str(verdict["ar"]["threads"])]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(" ".join(best_ar_options(args.model, args.device)))
