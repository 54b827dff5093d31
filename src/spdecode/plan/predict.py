"""One configuration's predicted speed: what runs where (`Setup`), the cost file's times for it at
the generation's context, and the simulator (simulate.py) or, for AR, one full pass per token.

Used by the planner (configurations beyond this machine) and by `plan --validate` (the ones
measurable here, side by side with their measurements).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..methods.spd_core import ONE_NODE, TreeShape
from ..runtime.errors import SpdError
from .cost_model import Costs
from .simulate import simulate


@dataclass(frozen=True)
class Setup:
    """method: ar, sd, eagle or spd; sizes: the target's stages (one for ar, sd, eagle);
    distributed: one process per stage; threads: the cost file's key for each process's
    timings ("1", "2", "1 concurrent"); shape: the draft tree (sd's chain of gamma is the tree
    gamma deep with one child per node); drafter: whose pass a draft level costs (a bundled
    draft's name in the cost file, "early-exit:K", or None: free, e.g. prompt lookup); chain:
    sd's chain, drafted by a draft model over its own cache (methods/sd.py), not a tree."""

    method: str
    sizes: tuple[int, ...]
    threads: str
    distributed: bool = False
    shape: TreeShape = ONE_NODE
    drafter: str | None = None
    chain: bool = False

    def draft_pass(self, costs: Costs):
        if self.drafter and self.drafter.startswith("early-exit:"):
            depth = int(self.drafter.split(":")[1])
            return lambda rows: costs.early_exit_pass(depth, rows)
        return lambda rows: costs.draft_pass(self.drafter, rows)

    def drafter_timed(self, drafts: dict) -> bool:
        """Whether the cost file's timed drafts (`drafts`) say what this setup's drafting costs
        (else it is taken as free)."""
        return self.drafter is None or self.drafter.startswith("early-exit:") or self.drafter in drafts


def predict(data: dict, setup: Setup, acceptance, prompt: int, tokens: int, timeline: bool = False) -> dict:
    """Predicted decode seconds and tok/s of one generation of `tokens` new tokens (the first one
    from the prefill, as every engine counts it) after a `prompt`-token prompt; `timeline`: with
    the simulated phases per rank (`events`, for simulate.write_timeline)."""
    if tokens < 2:
        raise SpdError("a prediction needs at least two new tokens (the first comes from the prefill)")
    costs = Costs(data, setup.threads, context=prompt + tokens / 2)
    if setup.method == "ar":
        step = costs.ar_token()
        t = (tokens - 1) * step
        out = {"decode_s": t, "new_tokens": tokens, "tok_s": (tokens - 1) / t, "tokens_per_cycle": 1.0,
               "cycles": tokens - 1, "utilisation": [1.0]}
        if timeline:
            out["events"] = [(0, "token", i * step, (i + 1) * step) for i in range(tokens - 1)]
        return out
    return simulate(costs, list(setup.sizes), acceptance, setup.shape, setup.distributed, setup.draft_pass(costs),
                    tokens=tokens, prompt=prompt, cycle_s=costs.cycle_bookkeeping(setup.drafter), timeline=timeline,
                    own_cache=setup.chain)


def pooled_prediction(results: list[dict]) -> dict:
    """Several generations' predictions pooled as bench pools measurements (token-weighted)."""
    new = sum(r["new_tokens"] - 1 for r in results)
    t = sum(r["decode_s"] for r in results)
    cycles = sum(r["cycles"] for r in results)
    return {"tok_s": new / t if t else None, "tokens_per_cycle": new / cycles if cycles else None}
