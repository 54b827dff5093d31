"""SPD is lossless: greedy output equals AR token for token, sampled output follows AR's distribution."""

import pytest
import torch
from conftest import tiny_model
from distribution import sampled_vs_exact
from oracles import ReferenceDrafter

from spdecode.drafting.pdm import depth_to_type, load_pdm, new_pdm
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.methods.ar import generate_ar
from spdecode.methods.spd import generate_spd
from spdecode.methods.spd_core import TreeShape
from spdecode.runtime.errors import SpdError
from spdecode.runtime.sampling import SamplingParams
from spdecode.runtime.staged import StagedTarget

PROMPT = [5, 17, 42, 8, 33, 71, 9]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request):
    model = tiny_model(request.param)
    return model, generate_ar(StagedTarget(model), PROMPT, 40).tokens


@pytest.mark.parametrize("n", range(1, 7))
@pytest.mark.parametrize("accuracy", [1.0, 0.0, 0.5])
def test_greedy_equals_ar_with_scripted_drafters(tiny, n, accuracy):
    model, ref = tiny
    gen = generate_spd(StagedTarget(model, n), ReferenceDrafter(PROMPT, ref, 97, accuracy, seed=n), PROMPT, 40)
    assert gen.tokens == ref
    m = gen.metrics
    assert m.new_tokens == len(ref) == 1 + m.drafts_verified  # first token + one per verification
    if accuracy == 1.0:
        # Oracle: after the n-1 fill cycles every cycle emits a token (tokens/cycle 1, tau -> n).
        assert m.alpha == 1.0 and m.cycles == (m.new_tokens - 1) + (n - 1)
    if accuracy == 0.0 and n > 1:
        # Always wrong: every verification is a rejection followed by a full refill.
        assert m.alpha == 0.0 and m.cycles == n * (m.new_tokens - 1)


def verdicts(log, prompt: list[int], ref: list[int]) -> list[bool]:
    """Whether each verified draft was right, from the drafter's own proposals and the reference
    alone: the draft verified at position j is the one proposed after the right tokens (a draft
    proposed after a wrong one is flushed unverified), and it is right iff it is the reference's."""
    expected = list(prompt) + list(ref)
    out = []
    for j in range(len(prompt) + 1, len(expected)):
        made = [token for pos, before, token in log if pos == j and before == expected[:j]]
        assert len(made) == 1, (j, made)
        out.append(made[0] == expected[j])
    return out


@pytest.mark.parametrize("n", range(1, 7))
@pytest.mark.parametrize("accuracy", [1.0, 0.0, 0.5])
def test_spd_counts_follow_from_the_drafts_and_the_schedule(tiny, n, accuracy):
    """alpha's counts and the cycle count (hence tokens/cycle and tau) checked against what the
    drafter proposed and the schedule's rule, never against the formulas that define them."""
    model, ref = tiny
    drafter = ReferenceDrafter(PROMPT, ref, 97, accuracy, seed=n)
    m = generate_spd(StagedTarget(model, n), drafter, PROMPT, 40).metrics
    outcomes = verdicts(drafter.log, PROMPT, ref)
    if accuracy == 0.5:
        assert 0 < sum(outcomes) < len(outcomes)  # both branches were taken
    assert (m.drafts_verified, m.drafts_accepted) == (len(outcomes), sum(outcomes))
    # One cycle per verification, plus n-1 to fill the pipeline at the start and after each
    # rejection that another verification follows (test_schedule checks this rule).
    cycles = len(outcomes) + (n - 1) * (1 + sum(1 for ok in outcomes[:-1] if not ok))
    assert m.cycles == cycles
    assert m.tau == pytest.approx(n * len(outcomes) / cycles)


@pytest.mark.parametrize("n", range(1, 7))
@pytest.mark.parametrize("shape", [TreeShape(), TreeShape(6, 3, 3)], ids=["one node per slot", "trees"])
def test_greedy_equals_ar_with_untrained_pdm(tiny, n, shape):
    model, ref = tiny
    target = StagedTarget(model, n)
    pdm = new_pdm(target, "tiny", "fp", num_layers=2)
    assert generate_spd(target, PdmTreeDrafter(pdm), PROMPT, 40, shape=shape).tokens == ref


@pytest.mark.parametrize("n", range(1, 7))
@pytest.mark.parametrize("accuracy", [1.0, 0.0, 0.6])
def test_greedy_trees_equal_ar_with_scripted_drafters(tiny, n, accuracy):
    """Trees of right and wrong branches (always-right and always-wrong children, and mixed): AR's
    tokens, rollbacks of every depth; an oracle's chain of three right nodes per slot gives three
    tokens per verification once the pipeline is full."""
    model, ref = tiny
    drafter = ReferenceDrafter(PROMPT, ref, 97, accuracy, seed=n, branches=2)
    gen = generate_spd(StagedTarget(model, n), drafter, PROMPT, 40, shape=TreeShape(6, 3, 2))
    assert gen.tokens == ref
    m = gen.metrics
    if accuracy == 0.0:  # every walk stops at its root: one token per verdict, and the pipeline refills
        assert m.drafts_accepted == 0 and m.cycles == n * (m.new_tokens - 1)
    chain = generate_spd(StagedTarget(model, n), ReferenceDrafter(PROMPT, ref, 97, 1.0), PROMPT, 40,
                         shape=TreeShape(3, 3, 1))
    assert chain.tokens == ref
    assert chain.metrics.cycles <= (len(ref) - 1 + 2) // 3 + n + 1


def test_eos_inside_the_in_flight_window_is_cut_exactly(tiny):
    model, ref = tiny
    eos = ref[9]
    expected = ref[: ref.index(eos) + 1]
    gen = generate_spd(StagedTarget(model, 4), ReferenceDrafter(PROMPT, ref, 97, 1.0), PROMPT, 40, eos={eos})
    assert gen.tokens == expected  # the oracle had drafts past EOS in flight: none may leak
    assert gen.metrics.stop_reason == "eos" and gen.metrics.new_tokens == len(expected)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_eos_inside_a_tree_in_flight_is_never_passed(tiny, n):
    """An oracle's trees run past EOS in every slot in flight: the output stops exactly at it."""
    model, ref = tiny
    eos = ref[9]
    expected = ref[: ref.index(eos) + 1]
    gen = generate_spd(StagedTarget(model, n), ReferenceDrafter(PROMPT, ref, 97, 1.0, branches=2), PROMPT, 40,
                       eos={eos}, shape=TreeShape(6, 3, 2))
    assert gen.tokens == expected and gen.metrics.stop_reason == "eos"


def test_default_anchors_give_one_type_per_depth():
    assert depth_to_type([0, 8, 16, 23, 30], [8, 8, 7, 7]) == [0, 1, 2, 3, 4]
    # Custom anchors may share a type between depths.
    assert depth_to_type([0, 16, 30], [8, 8, 7, 7]) == [0, 0, 1, 1, 2]


def test_pdm_round_trip_and_wrong_base(tmp_path):
    model = tiny_model("llama")
    target = StagedTarget(model, 3)
    pdm = new_pdm(target, "tiny", "fp-a", num_layers=1, draft_vocab=torch.arange(10, 60))
    pdm.save(tmp_path / "d", dtype=torch.float32)
    loaded = load_pdm(tmp_path / "d", target, "fp-a")
    for (k, a), (_, b) in zip(pdm.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(SpdError, match="trained for tiny"):
        load_pdm(tmp_path / "d", target, "fp-b")
    with pytest.raises(SpdError, match="n=2"):
        load_pdm(tmp_path / "d", StagedTarget(model, 2), "fp-a")
    with pytest.raises(SpdError, match="not a PDM checkpoint"):
        load_pdm(tmp_path, target, "fp-a")


def spd_vs_exact(drafter_kind, samples=3000, n=3):
    """(TV distance of SPD samples to the exact AR distribution, TV of as many exact samples)."""
    model = tiny_model("llama", num_hidden_layers=3)
    target = StagedTarget(model, n)
    prompt, length = [5, 6, 7], 3
    shape = TreeShape()
    if drafter_kind == "pdm-subset":  # untrained PDM over half the vocabulary: mostly residual draws
        drafter = PdmTreeDrafter(new_pdm(target, "tiny", "fp", draft_vocab=torch.arange(0, 97, 2)))
    elif drafter_kind.startswith("trees"):  # the target's greedy path among wrong siblings, or an untrained PDM's
        ref = generate_ar(StagedTarget(model), prompt, length).tokens
        drafter = ReferenceDrafter(prompt, ref, 97, 0.7, branches=2) if drafter_kind == "trees" else \
            PdmTreeDrafter(new_pdm(target, "tiny", "fp"))
        shape = TreeShape(6, 3, 2)
    else:  # always proposes the greedy token, sharply: exercises accept and residual paths
        drafter = ReferenceDrafter(prompt, generate_ar(StagedTarget(model), prompt, length).tokens, 97, 1.0,
                                   sampled=True)
    return sampled_vs_exact(model, prompt, length, samples,
                            lambda params: generate_spd(target, drafter, prompt, length, params, shape=shape).tokens)


@pytest.mark.parametrize("drafter_kind", ["pdm-subset", "peaked", "trees", "trees-pdm"])
def test_sampling_matches_ar_distribution(drafter_kind):
    """Relative threshold: SPD's distance to the exact AR distribution must be within sampling noise,
    measured by drawing the same number of samples from the exact distribution itself."""
    # The untrained PDM drafts slowly (a tree per cycle): fewer draws, the threshold scaling with them.
    tv, noise = spd_vs_exact(drafter_kind, samples=1500 if drafter_kind in ("trees-pdm", "pdm-subset") else 3000)
    assert tv < 1.6 * noise, (tv, noise)


def test_distribution_test_catches_a_biased_verifier(monkeypatch):
    """The threshold has power: a verifier that keeps every draft lands far outside the noise."""
    import spdecode.methods.spd

    def keep_drafts(logits, sampler, successors=None):
        return [d.token if d is not None else sampler.choose(row) for row, d in zip(logits, successors, strict=True)]

    monkeypatch.setattr(spdecode.methods.spd, "target_choices", keep_drafts)
    tv, noise = spd_vs_exact("peaked", samples=1000)
    assert tv > 3 * noise, (tv, noise)


def test_distribution_test_catches_a_tree_verifier_that_prefers_drafted_children(monkeypatch):
    """The threshold has power over trees in a pipeline too: a verifier that, when the target's draw
    misses every child, takes the first drafted child anyway (as if children were the target's
    top guesses) lands far outside the noise."""
    import spdecode.methods.spd

    exact = spdecode.methods.spd.target_choices
    children = {}

    def biased(logits, sampler, successors=None):
        out = exact(logits, sampler, successors)
        rows = children.get("rows", [])
        return [c if c is not None and torch.rand(()) < 0.5 else y for y, c in zip(out, rows, strict=False)] + \
            out[len(rows):]

    orig = spdecode.methods.spd.LocalPipeline.cycle

    def cycle(self, run, slot):  # tell the biased verifier the first live child of every exiting row
        sched = run.sched
        children["rows"] = [next((sched.nodes[c].token for c in sched.live_children(i)), None)
                            for i in sched.exit_rows()]
        orig(self, run, slot)

    monkeypatch.setattr(spdecode.methods.spd, "target_choices", biased)
    monkeypatch.setattr(spdecode.methods.spd.LocalPipeline, "cycle", cycle)
    tv, noise = spd_vs_exact("trees", samples=1000, n=2)
    assert tv > 3 * noise, (tv, noise)


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, _ = tiny
    target = StagedTarget(model, 3)
    drafter = PdmTreeDrafter(new_pdm(target, "tiny", "fp"))
    params = SamplingParams(temperature=1.0, seed=7)
    runs = [generate_spd(target, drafter, PROMPT, 20, params).tokens for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("method", ["spd", "sd", "ar"])
def test_a_prompt_near_the_context_end_still_decodes(method):
    """The last positions of the context are usable: the token budget is clamped by what a method writes
    past its last emitted token (SPD as published: n-1 in flight; SD: gamma), and exactly that room is
    reserved."""
    import warnings

    from spdecode.drafting.candidates import PromptLookupCandidates
    from spdecode.methods.sd import generate_sd

    model = tiny_model("llama")  # context 256
    prompt = [5, 6, 7, 8, 9] * 50
    ref = generate_ar(StagedTarget(model), prompt, 6).tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the clamp warns
        if method == "spd":
            gen = generate_spd(StagedTarget(model, 3), ReferenceDrafter(prompt, ref, 97, 0.5), prompt, 50)
            assert gen.tokens == ref[:4]  # 256 - 250 - (3 - 1)
        elif method == "sd":
            gen = generate_sd(StagedTarget(model), PromptLookupCandidates(97), prompt, 50, gamma=3)
            assert gen.tokens == ref[:3]  # 256 - 250 - 3
        else:
            assert generate_ar(StagedTarget(model), prompt, 50).tokens == ref


@pytest.mark.parametrize("method", ["ar", "spd", "spd-trees"])
def test_a_request_without_max_tokens_reserves_what_it_uses(method, monkeypatch):
    """A request allowed the whole context (a chat request without max_tokens) used to reserve a
    context's worth of KV cache and anchor store up front, however soon it ended. It reserves its
    first positions, and the buffers grow as the answer does, with the same tokens."""
    import spdecode.methods.spd as spd
    from spdecode.runtime.generation import RESERVE_AHEAD, Halt

    model = tiny_model("llama", max_position_embeddings=4096)
    ref = generate_ar(StagedTarget(model), PROMPT, 700).tokens
    stores = []
    monkeypatch.setattr(spd, "anchor_store", lambda *a, real=spd.anchor_store: stores.append(real(*a)) or stores[-1])

    def run(max_new_tokens, halt_after=None):
        """(tokens, KV cache capacity, anchor store rows) of one request."""
        target, halt, seen = StagedTarget(model, 1 if method == "ar" else 3), Halt(), []

        def on_token(t):
            seen.append(t)
            if len(seen) == halt_after:
                halt.set("stop")

        if method == "ar":
            return generate_ar(target, PROMPT, max_new_tokens, on_token=on_token, halt=halt).tokens, \
                target.cache.capacity, 0
        pdm = PdmTreeDrafter(new_pdm(target, "tiny", "fp", num_layers=2))
        shape = TreeShape(6, 3, 3) if method == "spd-trees" else TreeShape()
        gen = generate_spd(target, pdm, PROMPT, max_new_tokens, on_token=on_token, shape=shape, halt=halt)
        return gen.tokens, target.cache.capacity, stores[-1].buf[0].shape[0]

    tokens, cache, store = run(4000, halt_after=10)
    assert tokens == ref[:10]
    assert cache < 2 * RESERVE_AHEAD and store < 2 * RESERVE_AHEAD, (cache, store)
    tokens, cache, store = run(700)  # past the first reservation: the buffers grow, the tokens stay AR's
    assert tokens == ref and cache >= len(PROMPT) + 700 and (method == "ar" or store >= len(PROMPT) + 700)
