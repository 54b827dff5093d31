"""The fast greedy replay reproduces the SPD decoder's counters exactly."""

import torch
from conftest import tiny_model

from spdecode.ar import generate_ar
from spdecode.drafters import PDMDrafter
from spdecode.evaluate import replay_greedy
from spdecode.pdm import new_pdm
from spdecode.spd import generate_spd
from spdecode.staged import StagedTarget
from spdecode.train import TrainSettings, train
from spdecode.train_data import TeacherFeatures


def test_replay_matches_the_decoder(tmp_path):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 97, (6,), generator=g).tolist() for _ in range(14)]
    # Train a drafter on the target's own greedy text so that acceptance is mixed, not ~0.
    examples = []
    for p in prompts[:10]:
        out = generate_ar(StagedTarget(model), p, 40).tokens
        examples.append((p + out, [False] * len(p) + [True] * len(out)))
    for n in (1, 3):
        target = StagedTarget(model, n)
        pdm = new_pdm(target, "tiny", "fp", num_layers=1)
        teacher = TeacherFeatures(target, pdm.cfg.anchors + [target.n_layers], None, "fp")
        train(pdm, teacher, examples, [], tmp_path / f"n{n}", TrainSettings(epochs=8, lr=3e-3, warmup=2,
              batch_tokens=200, val_every=1000, save_every=1000), log=lambda *_: None)
        alphas = []
        for p in prompts[10:] + prompts[:2]:
            real = generate_spd(target, PDMDrafter(pdm), p, 30).metrics
            rep = replay_greedy(target, pdm, p, generate_ar(StagedTarget(model), p, 30).tokens)
            got = (rep["new_tokens"], rep["cycles"], rep["drafts_verified"], rep["drafts_accepted"])
            assert got == (real.new_tokens, real.cycles, real.drafts_verified, real.drafts_accepted), (n, p)
            alphas.append(real.alpha)
        assert 0 < sum(alphas) / len(alphas) < 1, alphas  # the comparison covered accepts and rejects
