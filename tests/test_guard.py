"""--method auto's online guard: a drafting run below break-even ends as AR, losslessly."""

import torch
from conftest import tiny_model
from distribution import sampled_vs_exact

from spdecode.drafting.pdm import new_pdm
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.methods.ar import generate_ar
from spdecode.methods.guard import Guard, guarded
from spdecode.methods.spd import generate_spd
from spdecode.methods.spd_core import TreeShape
from spdecode.runtime.generation import Halt
from spdecode.runtime.metrics import Metrics
from spdecode.runtime.sampling import GREEDY
from spdecode.runtime.staged import StagedTarget


def eagle_and_ar(layers=4, seed=0):
    target = StagedTarget(tiny_model("llama", num_hidden_layers=layers), 1)
    torch.manual_seed(seed)
    drafter = PdmTreeDrafter(new_pdm(target, "tiny", "fp", anchors=[0, layers], chain="feedback").eval())

    def eagle(ids, k, s=GREEDY, e=frozenset(), on_token=None, halt=None):
        return generate_spd(target, drafter, ids, k, s, e, on_token, shape=TreeShape(6, 3, 3), halt=halt)

    def ar(ids, k, s=GREEDY, e=frozenset(), on_token=None, halt=None):
        return generate_ar(target, ids, k, s, e, on_token, halt)

    return target, eagle, ar


def feed(guard: Guard, per_cycle: list[int]) -> int | None:
    """Drive the guard as a stop rule does: the cycle that set it, or None."""
    m, tokens = Metrics(), [0]
    guard.watch(tokens, m)
    for c, k in enumerate(per_cycle, start=1):
        m.cycles = c
        tokens += [0] * k
        guard.watch(tokens, m)
        if guard.is_set():
            return c
    return None


def test_the_guard_waits_a_window_and_trips_only_below_break_even():
    assert feed(Guard(1.5, window=8), [1] * 30) == 9  # cycles 1..8 surely over: a full window behind it
    assert feed(Guard(1.5, window=8), [2] * 30) is None
    assert feed(Guard(1.5, window=8), [3] * 6 + [1] * 40) is not None  # the run as a whole fell below too
    assert feed(Guard(1.5, window=8), [4] * 20 + [1] * 10) is None  # a bad stretch in a good run: not yet
    outer = Halt()
    g = Guard(1.5, outer)
    outer.set("stop string")
    assert g.is_set() and g.reason == "stop string"


def test_a_guarded_run_that_falls_back_is_ar_token_for_token():
    _, eagle, ar = eagle_and_ar()
    prompt = [5, 17, 42, 8, 33, 71, 9, 5, 17]
    want = ar(prompt, 60).tokens
    streamed = []
    got = guarded(eagle, ar, break_even=50.0, window=4)(prompt, 60, on_token=streamed.append)
    assert got.tokens == want and streamed == want
    m = got.metrics
    assert m.guard_fallback_at is not None and 1 < m.guard_fallback_at < 60
    assert m.new_tokens == 60 and m.stop_reason == "length" and m.phase_s["guard_ar"] > 0
    kept = guarded(eagle, ar, break_even=0.0, window=4)(prompt, 60)
    assert kept.tokens == want and kept.metrics.guard_fallback_at is None


def test_an_outside_halt_is_obeyed_and_not_taken_for_the_guard():
    _, eagle, ar = eagle_and_ar()
    halt = Halt()
    got = guarded(eagle, ar, break_even=0.0)([5, 6, 7, 8], 40, on_token=lambda t: halt.set("stop string"), halt=halt)
    assert len(got.tokens) == 1 and got.metrics.stop_reason == "stop string"
    assert got.metrics.guard_fallback_at is None


def test_a_guarded_run_samples_the_target_distribution_and_a_wrong_fallback_does_not():
    target, eagle, ar = eagle_and_ar(layers=3, seed=1)
    prompt, length = [5, 6, 7, 5, 6, 8, 5, 6], 4
    run = guarded(eagle, ar, break_even=50.0, window=1)
    assert run(prompt, length, GREEDY).metrics.guard_fallback_at is not None
    tv, noise = sampled_vs_exact(target.model, prompt, length, 1200, lambda p: run(prompt, length, p).tokens)
    assert tv < 1.6 * noise, (tv, noise)
    # A fallback that forgets the sampling settings (greedy AR for the rest) must fail the same test;
    # half the samples suffice (its distance is 3.4x the noise at 600 samples, 4.8x at 1200).
    wrong = guarded(eagle, lambda ids, k, s, e, on_token=None, halt=None: ar(ids, k, GREEDY, e, on_token, halt),
                    break_even=50.0, window=1)
    tv, noise = sampled_vs_exact(target.model, prompt, length, 600, lambda p: wrong(prompt, length, p).tokens)
    assert tv > 1.6 * noise, (tv, noise)


def test_a_guard_that_trips_on_the_end_of_sequence_token_stops_there():
    """Classic SD's chain checks its stop rule right after emitting a token: a guard tripping on an
    EOS token must end the request there, not hand AR a finished answer."""
    from spdecode.drafting.build import make_candidates
    from spdecode.methods.sd import sd_generator

    target, _, ar = eagle_and_ar()
    sd = sd_generator(target, make_candidates("early-exit:2", target.model, "float32", "cpu"), gamma=3)
    prompt = [5, 17, 42, 8, 33, 71, 9, 5, 17]
    for eos in dict.fromkeys(ar(prompt, 24).tokens[1:]):  # each token of the answer, once, as the EOS
        want = ar(prompt, 24, GREEDY, {eos})
        got = guarded(sd, ar, break_even=50.0, window=1)(prompt, 24, GREEDY, {eos})
        assert got.tokens == want.tokens and got.metrics.stop_reason == want.metrics.stop_reason, eos
