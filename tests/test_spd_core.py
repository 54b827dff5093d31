"""The SPD core driven by a fake executor: the schedule's costs, the settlement and the protocol checks,
with no model at all."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spdecode.methods.spd_core import SpdRun, Verdict
from spdecode.runtime.errors import SpdError
from spdecode.runtime.generation import StopRule
from spdecode.runtime.metrics import Metrics
from spdecode.runtime.verify import Draft

P = 5  # prompt length


class ScriptedDrafts:
    """Proposes the true token at a position iff `right[position]`, else a wrong one."""

    def __init__(self, truth, right):
        self.truth, self.right = truth, right

    def reset(self, prompt_len):
        pass

    def propose(self, run):
        pos = run.sched.draft_position
        good = run.tokens == self.truth[:pos] and self.right.get(pos, False)
        return Draft(self.truth[pos] if good else -pos, None)


class FakeExecutor:
    """Verifies against a known truth; records rollbacks and the pending drafts' high-water mark.
    `remote`: like rank 0 of the distributed engine, never looks at the candidate itself."""

    def __init__(self, truth, remote=False):
        self.truth, self.remote = truth, remote
        self.rollbacks, self.max_pending = [], 0
        self.sent = {}  # remote: each draft travels with its token, by position

    def prefill(self, run):
        return self.truth[P]

    def cycle(self, run, token, position):
        run.propose_draft()
        self.sent[run.sched.draft_position] = run.draft.token
        self.max_pending = max(self.max_pending, len(run.pending))
        if not run.sched.exits:
            return None
        q = run.sched.verify_position
        proposed = self.sent[q] if self.remote else run.candidate.token
        return Verdict.single(q, proposed == self.truth[q], self.truth[q])

    def rollback(self, position):
        self.rollbacks.append(position)


def run_once(n, right, length=30, eos=frozenset(), remote=False):
    truth = list(range(100, 100 + P)) + [1000 + i for i in range(length + n + 1)]
    m = Metrics(method="spd", n_stages=n)
    run = SpdRun(n, truth[:P], ScriptedDrafts(truth, right), StopRule(set(eos), length), m)
    ex = FakeExecutor(truth, remote)
    return run.drive(ex), ex, truth, run


def expected_cycles(n, right, new_tokens):
    """From the schedule's rules: the first exit after n cycles; after that, an accepted
    verification lets the next token exit one cycle later, a rejection costs a refill of n."""
    verified = range(P + 1, P + new_tokens)
    cycles = n
    for q in list(verified)[1:]:
        cycles += 1 if right.get(q - 1, False) else n
    return cycles


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), p=st.floats(0, 1))
def test_core_emits_the_truth_with_the_schedules_costs(n, seed, p):
    rng = random.Random(seed)
    right = {pos: rng.random() < p for pos in range(P, P + 60)}
    gen, ex, truth, run = run_once(n, right)
    assert gen.tokens == truth[P:P + 30]
    m = gen.metrics
    assert m.cycles == expected_cycles(n, right, 30)
    assert m.drafts_proposed == m.cycles
    rejected = [q for q in range(P + 1, P + 30) if not right.get(q, False)]
    assert m.drafts_verified == 29 and m.drafts_verified - m.drafts_accepted == len(rejected)
    assert ex.rollbacks == rejected  # every rejection rolls back to exactly the rejected position
    assert ex.max_pending <= n - 1


def test_unverified_drafts_are_released_when_verified_remotely():
    """An executor that verifies elsewhere (rank 0 of the distributed engine) never takes the
    candidate itself: the core still forgets each draft once its verdict is in."""
    right = {pos: pos % 3 != 0 for pos in range(P, P + 300)}
    _, ex, _, run = run_once(4, right, length=200, remote=True)
    assert ex.max_pending <= 3 and len(run.pending) <= 3


def test_eos_stops_at_once_even_with_drafts_in_flight():
    right = dict.fromkeys(range(P, P + 60), True)
    truth_eos = 1000 + 7
    gen, _, truth, _ = run_once(4, right, eos={truth_eos})
    assert gen.tokens == truth[P:P + 8] and gen.metrics.stop_reason == "eos"


class Broken(FakeExecutor):
    def __init__(self, truth, fault):
        super().__init__(truth)
        self.fault = fault

    def cycle(self, run, token, position):
        if self.fault == "no draft":
            return Verdict.single(run.sched.verify_position, True, 0) if run.sched.exits else None
        verdict = super().cycle(run, token, position)
        if self.fault == "early verdict" and verdict is None:
            return Verdict.single(position, True, token)
        if self.fault == "missing verdict":
            return None
        if self.fault == "wrong position" and verdict is not None:
            return Verdict.single(verdict.position + 1, True, 0)
        if self.fault == "accepts another token" and verdict is not None and verdict.accepted:
            return Verdict.single(verdict.position, True, verdict.tokens[0] + 1)
        if self.fault == "rejects the draft's own token" and verdict is not None:
            return Verdict.single(verdict.position, False, run.candidate.token)
        return verdict


@pytest.mark.parametrize("fault", ["no draft", "early verdict", "missing verdict", "wrong position",
                                   "accepts another token", "rejects the draft's own token"])
def test_a_confused_executor_is_an_error_not_a_wrong_answer(fault):
    truth = list(range(100, 140))
    right = dict.fromkeys(range(P, P + 40), True)
    run = SpdRun(3, truth[:P], ScriptedDrafts(truth, right), StopRule(set(), 10), Metrics())
    with pytest.raises(SpdError):
        run.drive(Broken(truth, fault))
