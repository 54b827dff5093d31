"""The EAGLE-style head (the n = 1 PDM drafting trees from the target's features): its training
layout is its inference view in both chaining modes, eagle decoding equals AR, training learns."""

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from distribution import sampled_vs_exact

from spdecode.drafting.drafters import AnchorStore
from spdecode.drafting.pdm import load_pdm, new_pdm
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.methods.ar import generate_ar
from spdecode.methods.schedule import TreeSchedule
from spdecode.methods.spd import generate_spd
from spdecode.methods.spd_core import TreeShape
from spdecode.runtime.errors import SpdError
from spdecode.runtime.staged import StagedTarget
from spdecode.runtime.tree import DraftTree
from spdecode.training.commands import init_from
from spdecode.training.features import TeacherFeatures
from spdecode.training.layout import chain_logits
from spdecode.training.loop import TrainSettings, evaluate, train


def head(family="llama", chain="embed", anchors=(0, 3, 6), seed=0):
    target = StagedTarget(tiny_model(family), 1)
    torch.manual_seed(seed)
    pdm = new_pdm(target, "tiny", "fp", anchors=list(anchors), draft_vocab=torch.arange(5, 90), chain=chain)
    return target, pdm.eval()


def features(target, anchors, ids):
    with torch.no_grad():
        h0 = target.embed(ids[None])
        _, got = target.run_layers(0, target.n_layers, h0, 0, capture=set(anchors))
    got[0] = h0
    return {j: got[j][0] for j in anchors}


def waiting_root(drafter, feats, ids, root):
    """A run whose root (ids[root], not yet entered) follows positions < root, whose target
    features are in the store: what the head sees at the start of a cycle."""
    pdm = drafter.pdm
    target = pdm.target[0]
    store = AnchorStore(pdm.cfg.anchors, target.config.hidden_size, target.dtype, target.device, len(ids))
    for j in pdm.cfg.anchors:
        store.put(j, 0, feats[j][:root])
    run = SimpleNamespace(sched=TreeSchedule(1, int(ids[root]), root), store=store, prompt_len=root, sampler=None,
                          n=1)
    drafter.reset(run)
    return run


@pytest.mark.parametrize("chain", ["embed", "feedback"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chain_layout_is_what_the_head_computes_when_drafting(family, chain):
    """chain_logits(k)[p] (node p, k-1 levels below the root p-k+1) == the drafter's logits for the
    same chain, over a cache that holds the target's features of positions < root."""
    S, depth = 18, 4
    target, pdm = head(family, chain)
    ids = torch.randint(3, 97, (S,), generator=torch.Generator().manual_seed(1))
    feats = features(target, pdm.cfg.anchors, ids)
    drafter = PdmTreeDrafter(pdm)
    with torch.no_grad():
        layout = {k: chain_logits(pdm, [feats[j] for j in pdm.cfg.anchors], k) for k in range(1, depth + 1)}
        for root in range(3, S - depth):
            run = waiting_root(drafter, feats, ids, root)
            tree = DraftTree.chain(ids[root + 1 : root + depth].tolist())
            got = drafter.tree_logits(run, tree)[:, pdm.vocab]
            for k in range(1, depth + 1):
                torch.testing.assert_close(got[k - 1], layout[k][root + k - 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chain", ["embed", "feedback"])
def test_a_branching_tree_gives_each_node_what_its_own_path_gives(chain):
    """Siblings never see each other: every node's logits equal those of the chain to it alone."""
    target, pdm = head("gemma3", chain)
    ids = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(2))
    feats = features(target, pdm.cfg.anchors, ids)
    tree = DraftTree((7, 8, 9, 10, 11, 12), (-1, -1, 0, 1, 2, 0))
    drafter = PdmTreeDrafter(pdm)
    with torch.no_grad():
        whole = drafter.tree_logits(waiting_root(drafter, feats, ids, 9), tree)
        for node in range(len(tree)):
            path = tree.path_to(node)
            alone = drafter.tree_logits(waiting_root(drafter, feats, ids, 9),
                                        DraftTree.chain([tree.tokens[i] for i in path]))
            torch.testing.assert_close(whole[1 + node], alone[len(path)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chain", ["embed", "feedback"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_eagle_greedy_equals_ar(family, chain):
    model = tiny_model(family)
    target = StagedTarget(model, 1)
    torch.manual_seed(0)
    pdm = new_pdm(target, "tiny", "fp", anchors=[0, 3, 6], chain=chain).eval()
    prompt = [5, 17, 42, 8, 33, 71, 9, 5, 17]
    want = generate_ar(StagedTarget(model), prompt, 40).tokens
    for budget, depth, topk in [(1, 1, 1), (6, 3, 2), (16, 5, 4)]:
        got = generate_spd(target, PdmTreeDrafter(pdm), prompt, 40, shape=TreeShape(budget, depth, topk))
        assert got.tokens == want
        m = got.metrics
        if budget > 1:  # a tree's walk is counted per depth (one node per slot: alpha says it all)
            assert m.drafts_accepted == sum(m.accepted_per_depth)


def test_eagle_sampling_follows_the_target_distribution():
    model = tiny_model("llama", num_hidden_layers=3)
    prompt, length = [5, 6, 7, 5, 6, 8, 5, 6], 3
    target = StagedTarget(model, 1)
    torch.manual_seed(0)
    drafter = PdmTreeDrafter(new_pdm(target, "tiny", "fp", anchors=[0, 3], chain="feedback").eval())
    tv, noise = sampled_vs_exact(model, prompt, length, 2500, lambda params: generate_spd(
        target, drafter, prompt, length, params, shape=TreeShape(6, 3, 3)).tokens)
    assert tv < 1.6 * noise, (tv, noise)


def test_an_spd_draft_is_refused_as_a_head(tmp_path):
    from spdecode.drafting.build import make_eagle_drafter

    target = StagedTarget(tiny_model("llama"), 2)
    new_pdm(target, "tiny", "fp").save(tmp_path / "spd")
    with pytest.raises(SpdError, match="not an EAGLE-style head"):
        make_eagle_drafter(StagedTarget(tiny_model("llama"), 1), "tiny", "fp", str(tmp_path / "spd"))


def test_an_spd_draft_seeds_a_feedback_head(tmp_path):
    """--init copies what matches by name and shape, and FC_fb starts as the embedding-only
    projection (zero weight on the fed-back output): the new head drafts as an embed head does."""
    model = tiny_model("llama")
    spd = new_pdm(StagedTarget(model, [3, 3]), "tiny", "fp", draft_vocab=torch.arange(5, 90))
    spd.save(tmp_path / "spd", dtype=torch.float32)
    target = StagedTarget(model, 1)
    eagle = new_pdm(target, "tiny", "fp", anchors=[0, 3, 6], draft_vocab=torch.arange(5, 90), chain="feedback")
    assert init_from(eagle, tmp_path / "spd") >= 5
    torch.testing.assert_close(eagle.layers[0].mlp.up_proj.weight, spd.layers[0].mlp.up_proj.weight)
    w = spd.fcs[0].weight
    torch.testing.assert_close(eagle.fc_feedback.weight, torch.cat([w, torch.zeros_like(w)], 1))
    eagle.save(tmp_path / "eagle", dtype=torch.float32)
    again = load_pdm(tmp_path / "eagle", target, "fp")
    assert again.cfg.chain == "feedback"
    torch.testing.assert_close(again.fc_feedback.weight, eagle.fc_feedback.weight)


@pytest.mark.parametrize("chain", ["embed", "feedback"])
def test_training_a_head_learns_deep_drafts(tmp_path, chain):
    """On motif text, a few hundred rows of training lift top-1 at the deepest trained window."""
    from test_train import repetitive_examples

    target, pdm = head("llama", chain, anchors=(0, 6))
    examples = repetitive_examples()
    teacher = TeacherFeatures(target, pdm.cfg.anchors + [target.n_layers], None, "fp")
    from spdecode.training.loop import TeacherHead

    before = evaluate(pdm, TeacherHead(pdm), teacher, examples, 0, (0, 0, 0))
    settings = TrainSettings(epochs=12, lr=3e-3, warmup=2, batch_tokens=200, val_every=1000, save_every=1000,
                             chain_depth=3)
    train(pdm, teacher, examples, [], tmp_path / "out", settings, log=lambda *_: None)
    after = evaluate(pdm, TeacherHead(pdm), teacher, examples, 0, (0, 0, 0))
    assert after["top1"] > before["top1"] + 0.2
    assert after["loss"] < before["loss"]


def test_the_method_builder_runs_eagle_from_a_saved_head(tmp_path):
    from spdecode.generators import MethodOptions, make_generator
    from spdecode.runtime.models import weights_fingerprint
    from spdecode.runtime.sampling import GREEDY

    model = tiny_model("qwen2")
    target = StagedTarget(model, 1)
    new_pdm(target, "tiny", weights_fingerprint(model), anchors=[0, 3, 6], chain="feedback").save(tmp_path / "head")
    prompt = [5, 17, 42, 8, 33, 71, 9, 5, 17]
    want = generate_ar(StagedTarget(model), prompt, 30).tokens
    run, stages = make_generator("eagle", model, "tiny", MethodOptions(draft=str(tmp_path / "head"), tree_budget=6,
                                                                       tree_depth=3, stages=3))
    assert stages == [6]  # eagle verifies in one pass through every layer, whatever --stages says
    assert run(prompt, 30, GREEDY, set()).tokens == want
    with pytest.raises(SpdError, match="no EAGLE-style head is bundled"):
        make_generator("eagle", model, "tiny", MethodOptions())
    with pytest.raises(SpdError, match="tree budget of at least 1"):
        make_generator("eagle", model, "tiny", MethodOptions(draft=str(tmp_path / "head"), tree_budget=0))
    with pytest.raises(SpdError, match="takes none"):
        make_generator("sd", model, "tiny", MethodOptions(draft=str(tmp_path / "head")))
    other = tiny_model("qwen2", seed=1)  # a head trained for other weights is refused
    with pytest.raises(SpdError, match="trained for"):
        make_generator("eagle", other, "tiny", MethodOptions(draft=str(tmp_path / "head")))
