"""The SPD pipeline schedule as a small pure state machine (no torch): who runs what, when.

n stages hold up to n in-flight tokens of one sequence at contiguous positions
start .. start+k-1. At the start of a cycle the token at start+i has depth k-1-i (it has passed
that many stages): the newest, at depth 0, is only embedded; the oldest is already verified.

One cycle:
  1. the drafter proposes a token for position start+k from features that exist before the cycle;
  2. stage s runs the in-flight token at depth s (all stages at once in a real pipeline);
  3. if the oldest token has now passed all n stages (k == n) it exits, and its logits verify the
     token at position start+1 (an in-flight draft, or for n == 1 this cycle's draft);
  4. accept (or no exit yet): the new draft enters at depth 0. Reject: every in-flight token after
     the oldest and the new draft are flushed, every layer's cache is rolled back to keep
     positions < start+1, and the corrected token enters alone at depth 0.

Each accepted draft costs one cycle; a rejection costs n (the refill), so tokens per cycle is
1 / (1 + (n-1)(1-alpha)) in steady state (see `tau`).
"""

from __future__ import annotations

from dataclasses import dataclass


def tau(alpha: float, n: int) -> float:
    """Theoretical speedup over AR: n stage-costs per AR step times steady-state tokens per cycle."""
    return n / (1 + (n - 1) * (1 - alpha))


@dataclass(frozen=True)
class Outcome:
    verified_position: int | None  # position whose token was decided this cycle (None: pipeline filling)
    accepted: bool | None
    rollback_to: int | None  # on reject: every layer keeps positions < rollback_to


class PipelineSchedule:
    def __init__(self, n_stages: int, first_position: int):
        """`first_position`: where the first generated token (chosen from the prefill) sits."""
        if n_stages < 1:
            raise ValueError("n_stages must be >= 1")
        self.n = n_stages
        self.start = first_position  # position of the oldest in-flight token
        self.k = 1  # number of in-flight tokens

    # -- what this cycle does --------------------------------------------------------------
    def work(self) -> list[tuple[int, int]]:
        """(stage, position) pairs of this cycle, deepest stage first.

        Deepest first is the order a single process must use: stage s consumes the hidden state
        stage s-1 produced in the previous cycle before stage s-1 overwrites it.
        """
        return [(s, self.start + self.k - 1 - s) for s in reversed(range(self.k))]

    def depth(self, position: int) -> int:
        """Depth at the start of this cycle of the in-flight token at `position`."""
        return self.start + self.k - 1 - position

    @property
    def draft_position(self) -> int:
        return self.start + self.k

    @property
    def exits(self) -> bool:
        """Whether the oldest token leaves the last stage (and verifies a draft) this cycle."""
        return self.k == self.n

    @property
    def verify_position(self) -> int:
        return self.start + 1

    def cache_lengths(self) -> list[int]:
        """Per-stage KV length at the start of this cycle: completed tokens plus deeper in-flight ones."""
        return [self.start + max(0, self.k - 1 - s) for s in range(self.n)]

    # -- end of cycle ----------------------------------------------------------------------
    def advance(self, accepted: bool | None = None) -> Outcome:
        """Close the cycle. `accepted` is the verification result when `exits`, else None."""
        if not self.exits:
            if accepted is not None:
                raise ValueError("nothing was verified this cycle")
            self.k += 1
            return Outcome(None, None, None)
        if accepted is None:
            raise ValueError("the oldest token exited: pass the verification result")
        verified = self.start + 1
        self.start = verified  # the old oldest is complete; the verified token is now the oldest
        if accepted:
            # k stays n: one token left at the bottom, the new draft entered at the top.
            return Outcome(verified, True, None)
        self.k = 1
        return Outcome(verified, False, verified)
