"""What every generation reports: counts, the speculative rates, and wall-clock time per phase.

Definitions (pooled over one generation; `bench` pools totals across prompts, never means of
per-prompt ratios):
- new_tokens: tokens emitted, the first one (chosen from the prefill logits) included.
- cycles: decode iterations after prefill (AR: one per token; SPD: one pipeline cycle).
- alpha: per-draft acceptance, drafts_accepted / drafts_verified.
- tokens_per_cycle: (new_tokens - 1) / cycles, the first token costing no cycle.
- tau: n_stages * tokens_per_cycle, the speedup over AR if a cycle cost 1/n of an AR step and
  drafting were free (a theoretical number: always shown beside the measured decode tok/s).
- Draft trees (SPD's engine core): nodes_entered, the rows that entered stage 0; wasted_rows,
  the stage-rows spent on nodes that died (pruned work); a verification is one step of a walk
  from a node with draft children, accepted when the walk went on into one of them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from . import trace


@dataclass
class Metrics:
    method: str = "ar"
    n_stages: int = 1
    prompt_tokens: int = 0
    new_tokens: int = 0
    cycles: int = 0
    drafts_proposed: int = 0
    drafts_verified: int = 0
    drafts_accepted: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    phase_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    stop_reason: str = ""
    chain: list[dict] | None = None  # PipeSpec: per-stage steps, verifications, rollbacks
    # Draft trees: per depth d (index d-1), the passes whose walk tried a node at depth d (the
    # path reached depth d-1 and had children there) and those that accepted one.
    verified_per_depth: list[int] | None = None
    accepted_per_depth: list[int] | None = None
    nodes_entered: int = 0
    wasted_rows: int = 0
    # Every verification pass in order, as [tried, accepted] (the drafts it checked, those that
    # went on); from the engine core a third, 1 where the walk ended at a node with no draft below
    # it (a leaf, not a rejection); from draft trees a fourth, each step's rank among the live
    # siblings by the drafter's score (0: its best): the exact sequence `spdecode plan` replays.
    walks: list[list] = field(default_factory=list)
    # Draft trees grown below the live tree (drafting.tree_build.grow_below): per frontier row
    # expanded, the drafter's log-probabilities of the children taken, in order. With the walks
    # the planner's stand-in grows the same trees, so tokens per cycle replay exactly.
    draft_scores: list[list[float]] = field(default_factory=list)
    # --method auto's online guard: the tokens emitted when it handed the request to AR (None: it did not).
    guard_fallback_at: int | None = None

    def record_walk(self, tried: int, accepted: int) -> None:
        """One walk's verifications by depth: the first `tried` steps tried, the first `accepted` went on."""
        if self.verified_per_depth is None:
            self.verified_per_depth, self.accepted_per_depth = [], []
        while len(self.verified_per_depth) < tried:
            self.verified_per_depth.append(0)
            self.accepted_per_depth.append(0)
        for d in range(tried):
            self.verified_per_depth[d] += 1
            self.accepted_per_depth[d] += d < accepted

    @property
    def alpha_per_depth(self) -> list[float] | None:
        if self.verified_per_depth is None:
            return None
        return [a / v if v else None for a, v in zip(self.accepted_per_depth, self.verified_per_depth, strict=True)]

    @property
    def drafts_rejected(self) -> int:
        return self.drafts_verified - self.drafts_accepted

    @property
    def alpha(self) -> float | None:
        return self.drafts_accepted / self.drafts_verified if self.drafts_verified else None

    @property
    def tokens_per_cycle(self) -> float | None:
        return (self.new_tokens - 1) / self.cycles if self.cycles else None

    @property
    def tau(self) -> float | None:
        tpc = self.tokens_per_cycle
        return None if tpc is None else self.n_stages * tpc

    @property
    def decode_tok_s(self) -> float | None:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else None

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "phase_s"}
        out["phase_s"] = dict(self.phase_s)
        # 7 decimals: a third of the characters, and no two of a tree's scores come that close.
        out["draft_scores"] = [[round(v, 7) for v in row] for row in self.draft_scores]
        for name in ("drafts_rejected", "alpha", "tokens_per_cycle", "tau", "decode_tok_s", "alpha_per_depth"):
            out[name] = getattr(self, name)
        return out

    def summary(self) -> str:
        parts = [f"{self.new_tokens} new tokens", f"prefill {self.prefill_s:.2f} s"]
        if self.decode_tok_s is not None:
            parts.append(f"decode {self.decode_tok_s:.1f} tok/s")
        if self.method != "ar":
            if self.alpha is not None:
                parts.append(f"alpha {self.alpha:.2f}")
            if self.tokens_per_cycle is not None:
                parts.append(f"tokens/cycle {self.tokens_per_cycle:.2f} tau {self.tau:.2f} (n={self.n_stages})")
            per_depth = self.alpha_per_depth
            if per_depth and any(a is not None for a in per_depth):
                parts.append("acceptance per depth " + " ".join("-" if a is None else f"{a:.2f}" for a in per_depth))
            if self.cycles and self.phase_s.get("draft"):
                parts.append(f"drafting {1e3 * self.phase_s['draft'] / self.cycles:.1f} ms/cycle")
            if self.cycles and self.nodes_entered > self.cycles:  # trees: what each cycle carried
                parts.append(f"per cycle: {self.nodes_entered / self.cycles:.1f} nodes entered, "
                             f"{self.drafts_verified / self.cycles:.2f} verified, "
                             f"{self.wasted_rows / self.cycles:.1f} stage-rows pruned")
        if self.guard_fallback_at is not None:
            parts.append(f"guard: drafting below break-even, AR from token {self.guard_fallback_at}")
        parts.append(f"stop: {self.stop_reason}")
        return f"[{self.method}] " + ", ".join(parts)


class Clock:
    """Adds wall time to named phases (a dict of seconds, e.g. Metrics.phase_s); while a trace is
    recorded (runtime.trace), each lap is also an event on the timeline."""

    def __init__(self, phases):
        self.phases, self.t = phases, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] += now - self.t
        if trace.active():
            trace.span(name, self.t, now)
        self.t = now
