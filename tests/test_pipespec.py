"""PipeSpec: a chain of processes that equals AR (greedy), follows AR's distribution (sampling),
and never leaves a process behind (on completion, on a killed stage, on a bad chain)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_model
from distribution import sampled_vs_exact
from hypothesis import given
from hypothesis import strategies as st
from serving import alive

from spdecode.methods.ar import generate_ar
from spdecode.methods.pipespec import PipeSpecChain, check_chain, expected_tokens_per_step, rho
from spdecode.runtime.errors import DecoderFailure, SpdError
from spdecode.runtime.sampling import SamplingParams
from spdecode.runtime.staged import StagedTarget

PROMPTS = [[5, 17, 42, 8, 33, 71, 9, 5, 17, 42], [3, 3, 3, 60, 61, 3, 3], [90, 1, 44]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipespec")
    model = tiny_model("llama")
    model.save_pretrained(root / "target")
    tiny_model("llama", seed=1, num_hidden_layers=2).save_pretrained(root / "small")
    refs = [generate_ar(StagedTarget(model), p, 40).tokens for p in PROMPTS]
    return root, model, refs


@pytest.mark.parametrize("chain", [["reference:1.0"], ["reference:0.0"], ["reference:0.5", "early-exit:3"],
                                   ["prompt-lookup", "early-exit:2"], ["early-exit:1", "early-exit:3"],
                                   ["model:SMALL"]])
def test_greedy_equals_ar(tiny_dir, chain):
    root, _, refs = tiny_dir
    chain = [c.replace("SMALL", str(root / "small")) for c in chain]
    # The scripted drafters get a second to draft first, so the counts below do not depend on how
    # the OS schedules the processes (a starved drafter would leave the target to generate alone).
    scripted = chain[0].startswith("reference:") and len(chain) == 1
    with PipeSpecChain(str(root / "target"), chain, gamma=3, patience=1.0 if scripted else 0.0) as ps:
        for prompt, ref in zip(PROMPTS, refs, strict=True):
            gen = ps.generate(prompt, 40, reference=ref)
            assert gen.tokens == ref
            m = gen.metrics
            assert m.drafts_accepted <= m.drafts_verified and m.new_tokens == len(ref)
            if chain == ["reference:1.0"]:
                assert m.alpha == 1.0 and m.cycles < len(ref) - 1  # several tokens per target step
            if chain == ["reference:0.0"]:
                assert m.alpha == 0.0 and m.cycles == len(ref) - 1  # one token per step
    assert all(not p.is_alive() for p in ps.procs) and all(p.exitcode == 0 for p in ps.procs)


def test_stops_at_eos(tiny_dir):
    root, _, refs = tiny_dir
    eos = refs[0][5]  # a token the target emits early on
    with PipeSpecChain(str(root / "target"), ["reference:1.0"], gamma=4, patience=1.0) as ps:
        gen = ps.generate(PROMPTS[0], 40, eos={eos}, reference=refs[0])
    assert gen.tokens == refs[0][: refs[0].index(eos) + 1] and gen.metrics.stop_reason == "eos"


def test_sampling_follows_ar_distribution(tiny_dir):
    root, model, _ = tiny_dir
    prompt = PROMPTS[1]
    with PipeSpecChain(str(root / "target"), ["early-exit:1", "early-exit:3"], gamma=2) as ps:
        tv, noise = sampled_vs_exact(model, prompt, 3, 1000, lambda params: ps.generate(prompt, 3, params).tokens)
    assert tv < 1.6 * noise, (tv, noise)


def test_a_killed_stage_stops_the_chain(tiny_dir):
    root, _, refs = tiny_dir
    ps = PipeSpecChain(str(root / "target"), ["early-exit:1", "early-exit:3"], gamma=3)
    os.kill(ps.procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(SpdError, match=r"stage 1 \(early-exit:3\) exited with code -9"):
        ps.generate(PROMPTS[0], 40)
    assert time.monotonic() - t0 < 10
    assert all(not p.is_alive() for p in ps.procs)
    with pytest.raises(DecoderFailure, match="closed"):
        ps.generate(PROMPTS[0], 4)
    assert "closed" in ps.problem()
    ps.restart()  # what a server does after a failure: new stage processes, the same answers
    try:
        assert ps.problem() is None
        assert ps.generate(PROMPTS[0], 40).tokens == refs[0]
        os.kill(ps.procs[0].pid, signal.SIGKILL)  # a stage that dies between requests
        deadline = time.monotonic() + 10
        while ps.problem() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "stage 0 (early-exit:1) exited" in ps.problem()
        ps.watch()  # a server's periodic check restarts it
        assert ps.problem() is None and ps.generate(PROMPTS[1], 40).tokens == refs[1]
    finally:
        ps.close()


OWNER = """
import sys
from spdecode.methods.pipespec import PipeSpecChain
if __name__ == "__main__":
    ps = PipeSpecChain(sys.argv[1], ["early-exit:1"], gamma=2)
    print(*[p.pid for p in ps.procs], flush=True)
    sys.stdin.read()
"""


def test_the_stages_end_when_the_process_that_started_them_is_killed(tiny_dir, tmp_path):
    """A chain's owner killed outright (no close): its stages see it and end. They are children of
    a fork server, which lives as long as they do, so watching their OS parent never saw it."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen([sys.executable, str(script), str(tiny_dir[0] / "target")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        stages = [int(p) for p in owner.stdout.readline().split()]
        assert len(stages) == 2 and alive(stages, within=0) == stages
    finally:
        owner.kill()
        owner.wait()
    assert not alive(stages, within=10), "stage processes outlived their owner"


def test_a_request_longer_than_the_timeout_is_no_failure(tmp_path):
    """The chain's deadline is an idle one: a request may run past `timeout` while tokens flow
    (it used to be a deadline for the whole request: a long answer failed and closed the chain)."""
    tiny_model("llama", max_position_embeddings=4096).save_pretrained(tmp_path / "long")
    with PipeSpecChain(str(tmp_path / "long"), ["early-exit:1"], gamma=2) as ps:
        ps.timeout = 0.5  # after the stages started (loading a model takes longer)
        t0 = time.monotonic()
        gen = ps.generate(PROMPTS[0], 3000)
        took = time.monotonic() - t0
    assert len(gen.tokens) == 3000
    assert took > 4 * ps.timeout, f"the request took only {took:.2f} s: too short to test the deadline"


def test_sampled_q_live_in_a_ring_of_2_gamma_slots(tiny_dir):
    """Sampled PipeSpec shares each stage's q per position with its downstream; only ~2 gamma + 1
    positions are live at once, so a ring of them, not a dense [answer length, vocab] tensor (which
    at a 2k context is ~400 MB of /dev/shm). A long run wraps the ring many times; each slot
    records its position, so a q read after it was overwritten would raise, not pass."""
    root, _, _ = tiny_dir
    shapes = []
    # patience: every verifying stage waits for its upstream's drafts, so q's are read all along.
    with PipeSpecChain(str(root / "target"), ["early-exit:1", "early-exit:3"], gamma=2, patience=1.0) as ps:
        gen = ps.generate(PROMPTS[0], 200, SamplingParams(temperature=1.0, seed=3),
                          on_token=lambda t: shapes.append(tuple(ps.shared.probs.shape)))
    assert len(gen.tokens) == 200 and gen.metrics.drafts_verified > 100
    assert set(shapes) == {(2, 2 * 2 + 2, 97)}


def test_a_stage_that_fails_to_start_is_reported(tiny_dir, tmp_path):
    root, _, _ = tiny_dir
    with pytest.raises(SpdError, match="does not exist"):  # checked before any process starts
        PipeSpecChain(str(tmp_path / "missing"), ["prompt-lookup"])
    with pytest.raises(SpdError, match=r"stage 1 \(early-exit:9\): SpdError: early-exit needs 1..5 layers"):
        PipeSpecChain(str(root / "target"), ["prompt-lookup", "early-exit:9"], timeout=60)


@pytest.mark.parametrize("chain,message", [([], "at least one drafter"), (["early-exit:x"], "expected"),
                                           (["early-exit:1", "prompt-lookup"], "only be the first")])
def test_bad_chains_are_rejected_before_starting(chain, message):
    with pytest.raises(SpdError, match=message):
        check_chain(chain)


@given(st.floats(0.01, 0.99), st.integers(1, 16))
def test_analytic_model(alpha, gamma):
    r = rho(alpha, gamma)
    assert 0 < r < 1
    assert expected_tokens_per_step(alpha, gamma) > 1  # the paper's guaranteed improvement
    assert expected_tokens_per_step(alpha, gamma) <= gamma + 1


def test_analytic_model_limits():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
