"""Property tests of the pure pipeline schedule over random accept/reject sequences."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spdecode.methods.schedule import PipelineSchedule, tau


def run(n, outcomes, P=7):
    """Drive the schedule with a model of per-stage KV lengths; check invariants every cycle."""
    sched = PipelineSchedule(n, P)
    lengths = [P] * n  # the prompt is in every layer after prefill
    verified = [P]  # positions whose tokens are decided (the first comes from the prefill)
    cycles, outcomes = 0, list(outcomes)
    while outcomes:
        assert lengths == sched.cache_lengths()
        work = sched.work()
        # Deepest stage first; stage s gets the token at depth s; positions are contiguous.
        assert [s for s, _ in work] == list(reversed(range(len(work))))
        assert [p for _, p in work] == list(range(sched.start, sched.start + len(work)))
        for s, p in work:
            assert p == lengths[s], "each stage sees tokens in position order, without gaps"
            lengths[s] += 1
        cycles += 1
        out = sched.advance(outcomes.pop(0) if sched.exits else None)
        if out.verified_position is not None:
            assert out.verified_position == verified[-1] + 1
            verified.append(out.verified_position)
        if out.rollback_to is not None:
            lengths = [min(x, out.rollback_to) for x in lengths]
            # A fresh run over the decided prefix would hold every position before the corrected token.
            assert lengths == [out.rollback_to] * n == sched.cache_lengths()
        assert sched.depth(sched.start) == sched.k - 1 and sched.draft_position == sched.start + sched.k
    return cycles, verified


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), outcomes=st.lists(st.booleans(), min_size=1, max_size=60))
def test_schedule_invariants_and_cycle_count(n, outcomes):
    cycles, verified = run(n, outcomes)
    assert len(verified) == 1 + len(outcomes)
    # Every verification costs one cycle, after a fill of n-1 cycles at the start and after each
    # rejection that is followed by another verification.
    refills = 1 + sum(1 for ok in outcomes[:-1] if not ok)
    assert cycles == len(outcomes) + (n - 1) * refills


def test_worked_example_from_the_reference_notes():
    """n=4, accept then reject (the timeline of spd-reference-notes §1.6): 9 cycles, 4 tokens."""
    cycles, verified = run(4, [True, False, True], P=100)
    assert cycles == 9 and verified == [100, 101, 102, 103]


def test_oldest_must_report_verification():
    s = PipelineSchedule(2, 0)
    with pytest.raises(ValueError):
        s.advance(True)  # nothing exits in the first cycle of a 2-stage pipeline
    s.advance()
    with pytest.raises(ValueError):
        s.advance()


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_tau_matches_simulated_schedule(n, alpha):
    rng = random.Random(n * 100 + int(alpha * 10))
    outcomes = [rng.random() < alpha for _ in range(20000)]
    cycles, verified = run(n, outcomes)
    simulated = n * (len(verified) - 1) / cycles
    assert simulated == pytest.approx(tau(alpha, n), rel=0.03)
