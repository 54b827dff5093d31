"""plan --validate waits for the machine's usual speed before what it times and runs (plan/steady.py),
and takes a part or a prompt again where the slow state may have met it."""

from types import SimpleNamespace

from spdecode.plan.steady import SteadyGate


def scripted(readings):
    """A gauge that reads `readings` in turn, each reading taking 2 s of a scripted clock."""
    left = list(readings)
    now = [0.0]

    def reading():
        now[0] += 2.0
        return left.pop(0)

    return dict(reading=reading, clock=lambda: now[0]), left


def test_a_wait_lasts_until_the_gauge_reads_near_its_fastest_and_no_longer_than_its_limit():
    io, left = scripted([1.0, 1.5, 1.4, 1.05, 1.0])
    gate = SteadyGate(**io, max_wait_s=60.0)
    assert gate.wait("first") and gate.events[-1]["waited_s"] == 2.0  # one reading
    assert gate.wait("second")  # 1.5 and 1.4 are the slow state; 1.05 is within 10 % of 1.0
    assert gate.events[-1]["waited_s"] == 6.0 and left == [1.0]
    # A slow state that outlasts the limit: the wait gives up, and says so.
    io, _ = scripted([1.0] + [1.5] * 100)
    gate = SteadyGate(**io, max_wait_s=10.0)
    gate.wait("first")
    assert not gate.wait("long") and gate.events[-1]["waited_s"] == 10.0
    assert gate.summary()["gave_up"] == 1 and gate.summary()["waited_s"] == 2.0 + 10.0
    # A faster reading later becomes the reference (the gate may have started in the slow state).
    io, _ = scripted([1.5, 1.0, 1.5, 1.0])
    gate = SteadyGate(**io, max_wait_s=10.0)
    assert gate.wait("a") and gate.wait("b") and gate.reference == 1.0
    assert gate.wait("c") and gate.events[-1]["waited_s"] == 4.0  # 1.5, then 1.0


def test_the_usual_reading_is_a_low_quantile_not_one_extreme():
    """One reading far below the rest (the gauge's luckiest pass) sets the reference only until there
    are enough readings for a quantile; then the machine's usual readings read steady again."""
    io, left = scripted([0.9] + [1.0] * 30)
    gate = SteadyGate(**io, max_wait_s=60.0)
    assert gate.wait("lucky") and gate.reference == 0.9
    # 1.0 is 11 % over 0.9: slow by the minimum, until the 11th reading puts the 10th percentile at 1.0.
    assert gate.wait("usual") and gate.events[-1]["waited_s"] == 20.0 and gate.reference == 1.0
    assert gate.wait("next") and gate.events[-1]["waited_s"] == 2.0
    assert gate.summary()["readings_over_reference"][2] == 1.0  # the median reading is the usual one
    # A slow state that covers most readings does not become the reference while a tenth are fast.
    io, _ = scripted([1.0] * 3 + [1.5] * 17 + [1.0] * 5)
    gate = SteadyGate(**io, max_wait_s=0.0)
    for i in range(20):
        gate.wait(str(i))
    assert gate.reference == 1.0 and not gate.steady(1.5)


def test_the_waits_stop_when_their_budget_is_spent():
    """A validation's waits in all are bounded: past the budget a unit is read and counted, but not
    waited for or taken again."""
    calls = []
    io, left = scripted([1.0] + [1.5] * 20)
    gate = SteadyGate(**io, max_wait_s=60.0, budget_s=8.0)
    gate.wait("first")
    # The first wait's reading took 2 s of the budget; the long wait gets the 6 left.
    assert not gate.wait("long") and gate.events[-1]["waited_s"] == 6.0 and gate.spent
    assert gate.around("part", lambda: calls.append("x")) is None and calls == ["x"]  # once, no wait
    assert [e["waited_s"] for e in gate.events if e["kind"] == "wait"][-1] == 2.0  # one reading
    summary = gate.summary()
    assert summary["budget_spent"] and summary["retaken"] == 0 and summary["gave_up"] == 2


def test_what_the_slow_state_met_is_taken_again_once():
    calls = []
    # wait ok, check slow -> taken again: wait ok, check ok.
    io, left = scripted([1.0, 1.3, 1.0, 1.0])
    gate = SteadyGate(**io, max_wait_s=0.0)
    assert gate.around("part", lambda: calls.append("x") or len(calls)) == 2
    assert calls == ["x", "x"] and not left and gate.summary()["retaken"] == 1
    # A check that reads slow every time: taken again once, then kept (and counted).
    io, _ = scripted([1.0, 1.3, 1.0, 1.3])
    gate = SteadyGate(**io, max_wait_s=0.0)
    calls.clear()
    assert gate.around("part", lambda: calls.append("x") or len(calls)) == 2 and len(calls) == 2
    # A steady machine: once.
    io, _ = scripted([1.0, 1.02])
    gate = SteadyGate(**io)
    calls.clear()
    gate.around("part", lambda: calls.append("x"))
    assert calls == ["x"] and gate.summary()["retaken"] == 0


def test_the_bench_runs_a_method_on_a_prompt_again_without_keeping_the_slow_attempt():
    """run_prompts with a gate: each method's run on each prompt is gated on its own (a few seconds,
    shorter than the slow state's episodes), the one the slow state met is run again alone, and the
    records hold each (prompt, method) once, from the attempt the gate kept."""
    from spdecode.bench.run import run_prompts
    from spdecode.runtime.generation import Generation
    from spdecode.runtime.metrics import Metrics

    attempts = []

    def runner(name):
        def run(ids, k, sampling, eos, on_token=None, halt=None):
            attempts.append(name)
            return Generation([7, 8], Metrics(method=name, new_tokens=2, decode_s=len(attempts)))
        return run

    tok = type("Tok", (), {"chat_template": None, "__call__": lambda self, s: SimpleNamespace(input_ids=[1, 2])})()
    sets = {"set": [{"question_id": 0, "turns": ["a"]}, {"question_id": 1, "turns": ["b"]}]}
    cfg = SimpleNamespace(max_new_tokens=2, sampling=None, temperature=0)
    # prompt 0: ar (wait ok, check ok), sd (the check before stands for its wait; check slow;
    # again: wait ok, check ok); prompt 1: ar and sd, each its check (the one before stands for its
    # wait). The scripted clock moves only while the gauge reads: each check is fresh.
    io, left = scripted([1.0, 1.0, 1.4, 1.0, 1.0, 1.0, 1.0])
    gate = SteadyGate(**io, max_wait_s=0.0)
    recs = run_prompts(cfg, {"ar": runner("ar"), "sd": runner("sd")}, {"ar": "float32", "sd": "float32"}, tok, sets,
                       set(), gate)
    assert not left and attempts[2:] == ["ar", "sd", "sd", "ar", "sd"]  # after the warm-ups
    assert [(r["question_id"], r["method"]) for r in recs] == [(0, "ar"), (0, "sd"), (1, "ar"), (1, "sd")]
    assert [r["decode_s"] for r in recs] == [3, 5, 6, 7]  # sd on prompt 0 from its second attempt
    assert [e["what"] for e in gate.events if e["kind"] == "retake"] == ["set prompt 0: sd"]
    assert all(r["matches_ar"] for r in recs if r["method"] == "sd")
    assert gate.summary()["gauges"] == 5  # a wait before each of the 5 runs


def test_a_steady_check_just_read_stands_for_the_next_wait():
    """Parts timed back to back: a steady check read within FRESH_S is the next wait's first reading
    (reading again tells nothing new); an older or slow one is not."""
    now = [0.0]
    readings = []

    def reading():
        readings.append(now[0])
        return 1.0

    gate = SteadyGate(reading=reading, clock=lambda: now[0], fresh_s=0.5)
    gate.around("a", lambda: None)
    gate.around("b", lambda: None)  # right after a's check: no reading before b
    assert readings == [0.0, 0.0, 0.0]
    gate.around("c", lambda: now.__setitem__(0, 1.0))  # c lasts 1 s; its check, then...
    now[0] = 2.0  # ...a second passes before d
    gate.around("d", lambda: None)
    assert readings == [0.0, 0.0, 0.0, 1.0, 2.0, 2.0]
    assert [e["what"] for e in gate.events if e["kind"] == "wait"] == ["a", "b", "c", "d"]
