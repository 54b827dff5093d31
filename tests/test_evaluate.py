"""The fast greedy replay reproduces the SPD decoder's counters exactly."""

import torch
from conftest import tiny_model, train_tiny_pdm

from spdecode.bench.replay import replay_greedy
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.methods.ar import generate_ar
from spdecode.methods.spd import generate_spd
from spdecode.runtime.staged import StagedTarget


def test_replay_matches_the_decoder(tmp_path):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 97, (6,), generator=g).tolist() for _ in range(14)]
    for n in (1, 3):
        target = StagedTarget(model, n)
        pdm = train_tiny_pdm(model, target.stage_sizes, prompts[:10], tmp_path / f"n{n}")
        alphas = []
        for p in prompts[10:] + prompts[:2]:
            real = generate_spd(target, PdmTreeDrafter(pdm), p, 30).metrics
            rep = replay_greedy(target, pdm, p, generate_ar(StagedTarget(model), p, 30).tokens)
            got = (rep["new_tokens"], rep["cycles"], rep["drafts_verified"], rep["drafts_accepted"])
            assert got == (real.new_tokens, real.cycles, real.drafts_verified, real.drafts_accepted), (n, p)
            alphas.append(real.alpha)
        assert 0 < sum(alphas) / len(alphas) < 1, alphas  # the comparison covered accepts and rejects
