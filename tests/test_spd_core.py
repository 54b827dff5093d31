"""The SPD core driven by a fake executor: the schedule's costs, the settlement and the protocol checks,
with no model at all."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spdecode.methods.spd_core import ONE_NODE, SpdRun
from spdecode.runtime.errors import SpdError
from spdecode.runtime.generation import StopRule
from spdecode.runtime.metrics import Metrics

P = 5  # prompt length


class ScriptedDrafts:
    """One node per slot: the true token at a position iff `right[position]`, else a wrong one."""

    method, after_stage0, anchors = "spd", False, []

    def __init__(self, truth, right):
        self.truth, self.right = truth, right

    def reset(self, run):
        pass

    def grow(self, run, now):
        leaf = run.sched.leaves(now)[-1]
        pos = run.sched.nodes[leaf].position + 1
        good = run.tokens_to(leaf) == self.truth[:pos] and self.right.get(pos, False)
        run.sched.add(self.truth[pos] if good else -pos, leaf, now=now)


class FakeExecutor:
    """The target's choice after every row of the exiting slot is the truth's next token there."""

    def __init__(self, truth):
        self.truth, self.exits = truth, 0

    def prefill(self, run):
        return self.truth[P]

    def choices(self, run):
        if run.sched.exiting is None:
            return None
        self.exits += 1
        return [self.truth[run.sched.nodes[i].position + 1] for i in run.sched.exit_rows()]

    def cycle(self, run, slot):
        run.grow()
        run.settle(self.choices(run))


def truth_for(length, n):
    return list(range(100, 100 + P)) + [1000 + i for i in range(length + 4 * n + 1)]


def run_once(n, right, length=30, eos=frozenset(), shape=ONE_NODE, executor=FakeExecutor):
    truth = truth_for(length, n)
    m = Metrics(method="spd", n_stages=n)
    run = SpdRun(n, truth[:P], ScriptedDrafts(truth, right), StopRule(set(eos), length), m, shape=shape)
    ex = executor(truth)
    return run.drive(ex), ex, truth, run


def expected_cycles(n, right, new_tokens):
    """From the published schedule's rules: the first exit after n cycles; after that, an accepted
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
    assert m.drafts_proposed == m.cycles and m.nodes_entered == m.cycles
    rejected = [q for q in range(P + 1, P + 30) if not right.get(q, False)]
    assert m.drafts_verified == 29 and m.drafts_verified - m.drafts_accepted == len(rejected)


def test_eos_stops_at_once_even_with_drafts_in_flight():
    right = dict.fromkeys(range(P, P + 60), True)
    gen, _, truth, _ = run_once(4, right, eos={1000 + 7})
    assert gen.tokens == truth[P:P + 8] and gen.metrics.stop_reason == "eos"


class Broken(FakeExecutor):
    fault = ""

    def cycle(self, run, slot):
        if self.fault == "no draft":
            run.settle(self.choices(run))
            return
        run.grow()
        if self.fault == "grows twice":
            run.grow()
        choices = self.choices(run)
        if self.fault == "settles twice":
            run.settle(choices)
        if self.fault == "no settlement":
            return
        if self.fault == "choices while filling" and choices is None:
            choices = [1]
        if self.fault == "too few choices" and choices:
            choices = choices[:-1]
        run.settle(choices)


@pytest.mark.parametrize("fault", ["no draft", "grows twice", "settles twice", "no settlement",
                                   "choices while filling", "too few choices"])
def test_a_confused_executor_is_an_error_not_a_wrong_answer(fault):
    right = dict.fromkeys(range(P, P + 40), True)
    executor = type("B", (Broken,), {"fault": fault})
    with pytest.raises(SpdError):
        run_once(3, right, length=10, executor=executor)
