"""Property tests of the pure tree schedule: random draft trees, random verification results, n = 1..6.

A model of every stage's cache (a list of what each slot holds) is driven by the schedule's plans,
exactly as the executors apply them; the target is a deterministic function of the prefix, so
the emitted tokens must be its greedy continuation whatever the drafts were.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spdecode.methods.schedule import State, TreeSchedule, tau

P = 6
PROMPT = list(range(50, 50 + P))
V = 40  # the toy vocabulary


def truth(prefix: tuple[int, ...]) -> int:
    """The toy target's token after `prefix`."""
    return (sum((i + 1) * t for i, t in enumerate(prefix)) * 7 + len(prefix)) % V


def path_tokens(sched: TreeSchedule, i: int) -> tuple[int, ...]:
    """Prompt + tokens from the first generated one down to node i."""
    out = []
    while i >= 0:
        out.append(sched.nodes[i].token)
        i = sched.nodes[i].parent
    return tuple(PROMPT) + tuple(reversed(out))


def ancestors_or_self(sched, i):
    out = set()
    while i >= 0:
        out.add(i)
        i = sched.nodes[i].parent
    return out


class Model:
    """Every stage's cache as a list: ('p', position) for the prompt, else the node id."""

    def __init__(self, n):
        self.caches = [[("p", p) for p in range(P)] for _ in range(n)]
        self.runs = {}  # (stage, node) -> times run

    def run(self, stage, layout, rows, sched):
        cache = self.caches[stage]
        assert layout.start == len(cache), "a chunk lands right after what the cache holds"
        committed = cache[:layout.committed]
        # The verified prefix sits at slot == position, and is what was verified there.
        for slot, entry in enumerate(committed):
            if not isinstance(entry, tuple):
                node = sched.nodes[entry]
                assert node.state is State.VERIFIED and node.position == slot
        keys = cache[layout.committed:] + list(rows)
        assert len(layout.positions) == len(keys)
        for i, row in zip(rows, layout.visible, strict=True):
            anc = ancestors_or_self(sched, i)
            # Each node sees exactly its ancestors and itself among the in-flight rows, and every
            # ancestor that is not in the verified prefix is such a row (seen after its ancestors).
            assert [k in anc for k in keys] == list(row)
            missing = {a for a in anc if sched.nodes[a].position >= layout.committed} - set(keys)
            assert not missing, "an ancestor was not run before its descendant"
        for k, pos in zip(keys, layout.positions, strict=True):
            assert sched.nodes[k].position == pos
        for i in rows:
            self.runs[stage, i] = self.runs.get((stage, i), 0) + 1
            assert self.runs[stage, i] == 1, "no node is computed twice by a stage"
        cache += list(rows)

    def compact(self, stage, plan):
        cache = self.caches[stage]
        assert plan.length == len(cache)
        self.caches[stage] = cache[:plan.dst] + [cache[s] for s in plan.src]


def fresh_view(sched, verified_upto, live_ids):
    """What a fresh run over the verified prefix, then the surviving nodes, would hold."""
    return [("p", p) for p in range(P)] + verified_upto + live_ids


def drive(n, rng, accuracy, budget, max_tokens=30, same_slot=None):
    """Run the schedule with a random drafter and the toy target; returns (emitted, sched, cycles)."""
    same_slot = budget > 1 if same_slot is None else same_slot
    first = truth(tuple(PROMPT))
    sched = TreeSchedule(n, first, P)
    model = Model(n)
    emitted, cycles = [first], 0

    def grow(now):
        live = sched.live()
        leaves = [i for i in live if not any(sched.nodes[c].state is State.DRAFT for c in sched.nodes[i].children)]
        if now:
            leaves = [i for i in leaves if i not in sched.drafted]
        for _ in range(budget):
            if not leaves:
                break
            parent = rng.choice(leaves)
            right = truth(path_tokens(sched, parent))
            taken = {sched.nodes[c].token for c in sched.nodes[parent].children if sched.nodes[c].state is State.DRAFT}
            token = right if rng.random() < accuracy else rng.randrange(V)
            if token in taken:
                continue
            leaves.append(sched.add(token, parent, now=now))

    while len(emitted) < max_tokens:
        cycles += 1
        if same_slot and sched.root_waits:
            grow(True)
        slot = sched.enter()
        grow(False)
        for stage, s in sched.stage_slots():
            if stage == 0:
                model.run(0, s.layout0, s.rows, sched)
            else:
                model.compact(stage, s.compaction)
                model.run(stage, s.layout, s.down_rows, sched)
        rows = sched.exit_rows()
        choices = [truth(path_tokens(sched, i)) for i in rows] if sched.exiting else None
        before = len(emitted)
        done = sched.finish(choices)
        model.compact(0, done.stage0)
        if done.verdict is not None:
            emitted += list(done.verdict.tokens)
            assert len(emitted) > before
        # Stage 0 now holds exactly the verified prefix it ran, then the live nodes it ran.
        verified = [i for i in model.caches[0][P:] if sched.nodes[i].state is State.VERIFIED]
        live = [i for i in model.caches[0][P:] if sched.nodes[i].state is State.DRAFT]
        assert model.caches[0] == fresh_view(sched, verified, live)
        assert [sched.nodes[i].position for i in verified] == list(range(P, P + len(verified)))
        assert slot.index == cycles
    return emitted[:max_tokens], sched, cycles, model


def ar(length):
    seq = list(PROMPT)
    for _ in range(length):
        seq.append(truth(tuple(seq)))
    return seq[P:]


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), accuracy=st.floats(0, 1), budget=st.integers(1, 6))
def test_any_trees_and_verdicts_emit_the_targets_tokens_with_sound_caches(n, seed, accuracy, budget):
    emitted, sched, cycles, model = drive(n, random.Random(seed), accuracy, budget)
    assert emitted == ar(30)
    # A downstream stage that runs the plans still in flight to it holds what a fresh run would:
    # the verified prefix, then the live nodes, and nothing dead.
    for stage in range(1, n):
        for slot in sched.in_flight:
            if slot.index > sched.cycle - stage and slot.compaction is not None:
                model.compact(stage, slot.compaction)
                model.caches[stage] += slot.down_rows
        rows = model.caches[stage][P:]
        verified = [i for i in rows if sched.nodes[i].state is State.VERIFIED]
        assert rows == verified + [i for i in rows if sched.nodes[i].state is State.DRAFT]
        assert [sched.nodes[i].position for i in verified] == list(range(P, P + len(verified)))


def test_oracle_chains_verify_a_whole_slot_per_cycle():
    """Every drafted node right and one chain per slot: after the fill, each exit accepts its slot."""
    emitted, sched, cycles, _ = drive(3, random.Random(0), 1.0, 1)
    assert emitted == ar(30) and cycles == 29 + 2  # one token per cycle after n - 1 fill cycles


def one_node_outcomes(n, outcomes):
    """Top-1 SPD on the tree schedule: each exit's single child is right iff the next outcome says so."""
    first = truth(tuple(PROMPT))
    sched = TreeSchedule(n, first, P)
    outcomes, cycles, verified = list(outcomes), 0, 1
    while outcomes:
        cycles += 1
        sched.enter()
        leaf = sched.live()[-1]
        sched.add(99, leaf)  # the draft: token 99; the target says 99 iff the outcome is True
        rows = sched.exit_rows()
        if sched.exiting is None:
            sched.finish(None)
            continue
        ok = outcomes[0]
        choices = [99 if (i == sched.root and ok) else 98 for i in rows]
        done = sched.finish(choices)
        if done.verdict is not None:
            outcomes.pop(0)
            verified += len(done.verdict.tokens)
            assert len(done.verdict.tokens) == 1 and (done.verdict.node is not None) == ok
    return cycles, verified


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), outcomes=st.lists(st.booleans(), min_size=1, max_size=60))
def test_one_node_per_slot_costs_what_spd_as_published_costs(n, outcomes):
    cycles, verified = one_node_outcomes(n, outcomes)
    assert verified == 1 + len(outcomes)
    # One cycle per verification after a fill of n-1 cycles at the start and after each rejection
    # that is followed by another verification (the old PipelineSchedule's count).
    refills = 1 + sum(1 for ok in outcomes[:-1] if not ok)
    assert cycles == len(outcomes) + (n - 1) * refills


def test_worked_example_from_the_reference_notes():
    """n=4, accept then reject (the timeline of spd-reference-notes §1.6): 9 cycles, 4 tokens."""
    cycles, verified = one_node_outcomes(4, [True, False, True])
    assert cycles == 9 and verified == 4


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_tau_matches_simulated_schedule(n, alpha):
    rng = random.Random(n * 100 + int(alpha * 10))
    outcomes = [rng.random() < alpha for _ in range(5000)]
    cycles, verified = one_node_outcomes(n, outcomes)
    assert n * (verified - 1) / cycles == pytest.approx(tau(alpha, n), rel=0.03)


def test_a_correction_kills_every_draft_and_waits_to_enter():
    sched = TreeSchedule(2, 7, P)
    sched.enter()
    a = sched.add(1, sched.root)
    sched.finish(None)  # cycle 1: nothing exits at n = 2
    sched.enter()
    b = sched.add(2, a)
    done = sched.finish([5])  # the root's slot exits; the target says 5, no child carries it
    v = done.verdict
    assert v.node is None and v.tokens == (5,) and v.accepted == ()
    assert sched.nodes[a].state is State.DEAD and sched.nodes[b].state is State.DEAD
    assert sched.root_waits and sched.waiting == [sched.root] and sched.nodes[sched.root].position == P + 1
    # Stage 0 holds the first token (verified in cycle 1) and forgets node a at once; the stages
    # after it get a's slot as nothing.
    assert (done.stage0.dst, done.stage0.src, done.stage0.length) == (P + 1, (), P + 2)
    assert done.leaving.down_rows == []


def test_drafts_must_hang_below_the_root():
    sched = TreeSchedule(2, 7, P)
    sched.enter()
    a = sched.add(1, sched.root)
    with pytest.raises(ValueError):
        sched.add(1, sched.root)  # the same token twice under one parent
    with pytest.raises(ValueError):
        sched.add(3, a, now=True)  # entering now below a node that enters next cycle
    with pytest.raises(ValueError):
        sched.finish([1])  # nothing exits in the first cycle of a 2-stage pipeline
