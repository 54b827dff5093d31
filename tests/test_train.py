"""Training the PDM: the training layout is the inference view, training learns, checkpoints resume."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from spdecode.data import load_prompt_set, normalise, stream_json_array
from spdecode.drafting.drafters import AnchorStore
from spdecode.drafting.pdm import WEIGHTS_FILE, new_pdm
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.runtime.errors import SpdError
from spdecode.runtime.staged import StagedTarget
from spdecode.training import loop as train_mod
from spdecode.training.features import TeacherFeatures, build_draft_vocab
from spdecode.training.layout import layout_logits, profile_logits
from spdecode.training.loop import TrainSettings, train


def anchors_of(target, pdm, ids):
    with torch.no_grad():
        h0 = target.embed(ids[None])
        _, got = target.run_layers(0, target.n_layers, h0, 0, capture=set(pdm.cfg.anchors))
    got[0] = h0
    return [got[j][0] for j in pdm.cfg.anchors]


class PathInFlight:
    """The part of a schedule the PDM reads (methods.schedule.TreeSchedule's interface): one path
    in flight, its root at position `root`, the node at position p at depths[t - p] (newest first)."""

    def __init__(self, ids, root, t, depths):
        self.nodes = {p: SimpleNamespace(token=int(ids[p]), parent=p - 1, position=p, score=0.0, children=[])
                      for p in range(root, t + 1)}
        self.nodes[root].parent = -1
        self.root, self.drafted, self.t, self.depths = root, [], t, depths

    def live(self):
        return list(self.nodes)

    def depth(self, i):
        return self.depths[self.t - i]


def path_run(store, ids, root, t, depths):
    return SimpleNamespace(sched=PathInFlight(ids, root, t, depths), store=store, prompt_len=root, sampler=None, n=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("layers", [1, 2])
def test_training_rows_see_exactly_what_inference_rows_see(family, layers):
    """Layout logits for (position t, the depths of the rows in flight) == what the SPD drafter
    computes there: SPD's published windows and paths through trees in flight (runs of rows per
    depth), from a fresh drafter and from one that advanced cycle by cycle (incremental cache)."""
    n, S = 3, 20
    target = StagedTarget(tiny_model(family), n)
    pdm = new_pdm(target, "tiny", "fp", num_layers=layers, draft_vocab=torch.arange(10, 70))
    ids = torch.randint(3, 97, (S,), generator=torch.Generator().manual_seed(0))
    anchors = anchors_of(target, pdm, ids)
    store = AnchorStore(pdm.cfg.anchors, target.config.hidden_size, torch.float32, "cpu", 64)
    for j, a in zip(pdm.cfg.anchors, anchors, strict=True):
        store.put(j, 0, a)
        store.put_nodes(j, list(range(S)), a)  # node p is the token at position p
    windows = [(0,), (0, 1), (0, 1, 2), (0, 0, 1, 1, 2), (1, 1), (0, 0, 0), (1, 2, 2)]
    with torch.no_grad():
        for depths in windows:
            layout = profile_logits(pdm, anchors, depths)
            for t in range(len(depths) + 1, S):
                drafter = PdmTreeDrafter(pdm)
                run = path_run(store, ids, t - len(depths) + 1, t, depths)
                run.n = n
                drafter.reset(run)
                got = pdm.head(drafter._in_flight(run, run.sched.live())[-1:])[0]
                torch.testing.assert_close(got, layout[t], rtol=1e-4, atol=1e-4)
        assert torch.equal(layout_logits(pdm, anchors, 3), profile_logits(pdm, anchors, (0, 1, 2)))
        # A drafter that lives through a fill (k = 1, 2, .., n), a steady state and a rollback.
        live = PdmTreeDrafter(pdm)
        steps = [(8, 8), (9, 8), (10, 8), (11, 9), (12, 10), (13, 13), (14, 13), (15, 13), (16, 14)]
        for i, (t, root) in enumerate(steps):
            depths = tuple(range(t - root + 1))
            run = path_run(store, ids, root, t, depths)
            run.n = n
            if i == 0:
                live.reset(run)
            got = pdm.head(live._in_flight(run, run.sched.live())[-1:])[0]
            torch.testing.assert_close(got, profile_logits(pdm, anchors, depths)[t], rtol=1e-4, atol=1e-4)


def repetitive_examples(count=24, length=40, seed=0):
    """Sequences built from a few repeated motifs, so a drafter can learn them; the 'assistant' half is masked in."""
    g = torch.Generator().manual_seed(seed)
    motifs = [torch.randint(3, 97, (5,), generator=g).tolist() for _ in range(4)]
    out = []
    for _ in range(count):
        ids = []
        while len(ids) < length:
            ids += motifs[int(torch.randint(0, 4, (1,), generator=g))]
        ids = ids[:length]
        out.append((ids, [False] * (length // 4) + [True] * (length - length // 4)))
    return out


def setup_training(tmp_path, n=2):
    target = StagedTarget(tiny_model("llama"), n)
    examples = repetitive_examples()
    vocab, coverage = build_draft_vocab(examples, 64, 97)
    pdm = new_pdm(target, "tiny", "fp", num_layers=1, draft_vocab=vocab)
    teacher = TeacherFeatures(target, pdm.cfg.anchors + [target.n_layers], tmp_path / "cache", "fp")
    return pdm, teacher, examples[:-4], examples[-4:], coverage


@pytest.mark.parametrize("topk", [0, 5])
def test_a_few_steps_lower_the_loss(tmp_path, topk):
    """Plain KL, and KL with the top-K distillation term: either way the held-out KL falls and the
    draft agrees with the teacher more often."""
    pdm, teacher, train_ex, val_ex, coverage = setup_training(tmp_path)
    assert coverage == 1.0  # 4 motifs of 5 tokens fit in 64 draft tokens
    head = train_mod.TeacherHead(pdm)
    before = train_mod.evaluate(pdm, head, teacher, val_ex, len(train_ex), (0, 1))
    settings = TrainSettings(epochs=6, lr=3e-3, warmup=2, batch_tokens=200, val_every=1000, save_every=1000,
                             topk=topk)
    train(pdm, teacher, train_ex, val_ex, tmp_path / "run", settings, log=lambda *_: None)
    after = train_mod.evaluate(pdm, head, teacher, val_ex, len(train_ex), (0, 1))
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert after["top1"] > before["top1"] and after["top8"] >= before["top8"]


def test_resume_continues_from_the_same_step(tmp_path):
    settings = TrainSettings(epochs=1, lr=1e-3, warmup=1, batch_tokens=200, val_every=1000, save_every=1)
    pdm, teacher, train_ex, val_ex, _ = setup_training(tmp_path)
    straight = train(pdm, teacher, train_ex, val_ex, tmp_path / "a", settings, log=lambda *_: None)
    total = straight["step"]
    assert total >= 4

    pdm2, teacher2, *_ = setup_training(tmp_path)
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def interrupting_step(self, *a, **k):  # Ctrl-C arrives during the 3rd optimiser step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = interrupting_step
    try:
        with pytest.raises(KeyboardInterrupt):
            train(pdm2, teacher2, train_ex, val_ex, tmp_path / "b", settings, log=lambda *_: None)
    finally:
        torch.optim.AdamW.step = real_step
    # Plain values only: it loads without unpickling code (as resume reads it).
    state = torch.load(train_mod.checkpoint_dir(tmp_path / "b") / train_mod.STATE_FILE, weights_only=True)
    assert state["step"] == 2  # the interrupted step was not counted; the checkpoint is complete

    pdm3, teacher3, *_ = setup_training(tmp_path)
    resumed = train(pdm3, teacher3, train_ex, val_ex, tmp_path / "b", settings, resume=True, log=lambda *_: None)
    assert resumed["step"] == total
    a, b = load_file(tmp_path / "a" / WEIGHTS_FILE), load_file(tmp_path / "b" / WEIGHTS_FILE)
    for k in a:  # bit for bit: the resumed run continues exactly where the straight one went
        assert torch.equal(a[k], b[k]), k


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_resume_unpickles_nothing_but_tensors_and_plain_values(tmp_path, monkeypatch):
    """A checkpoint directory from someone else must not run their code on --resume."""
    settings = TrainSettings(epochs=1, lr=1e-3, warmup=1, batch_tokens=200, val_every=1000, save_every=1)
    pdm, teacher, train_ex, val_ex, _ = setup_training(tmp_path)
    train(pdm, teacher, train_ex, val_ex, tmp_path / "run", settings, log=lambda *_: None)
    path = train_mod.checkpoint_dir(tmp_path / "run") / train_mod.STATE_FILE
    torch.save({**torch.load(path, weights_only=True), "history": _RunsCode()}, path)
    monkeypatch.chdir(tmp_path)
    pdm2, teacher2, *_ = setup_training(tmp_path)
    with pytest.raises(SpdError, match="not a plain training checkpoint"):
        train(pdm2, teacher2, train_ex, val_ex, tmp_path / "run", settings, resume=True, log=lambda *_: None)
    assert not (tmp_path / "pwned").exists()


def test_teacher_cache_serves_the_same_anchors_and_dtype_only(tmp_path, monkeypatch):
    """A second run with the same anchors and teacher dtype reads the cache (no pass of the target),
    batched warm-up included; other anchors or another dtype run their own pass."""
    target = StagedTarget(tiny_model("llama"), 3)
    examples = [(list(range(5, 25)), []), (list(range(7, 19)), [])]
    first = TeacherFeatures(target, [0, 2, 4, 6], tmp_path, "fp")
    first.warm(examples, batch_size=2)
    assert len(list(tmp_path.iterdir())) == 2  # one file a sequence, only its anchors in it

    def no_pass(*_a, **_k):
        raise AssertionError("the target ran although the cache holds these features")

    again = TeacherFeatures(target, [0, 2, 4, 6], tmp_path, "fp")
    monkeypatch.setattr(again, "compute", no_pass)
    monkeypatch.setattr(again, "compute_batch", no_pass)
    again.warm(examples, batch_size=2)
    for i in range(2):
        assert torch.equal(again.get(i, examples[i][0])["anchors"], first.get(i, examples[i][0])["anchors"])
    monkeypatch.undo()
    other = TeacherFeatures(StagedTarget(target.model, 2), [0, 3, 6], tmp_path, "fp").get(0, examples[0][0])
    half = TeacherFeatures(StagedTarget(tiny_model("llama").to(torch.bfloat16), 3), [0, 2, 4, 6], tmp_path, "fp")
    half.get(0, examples[0][0])
    assert len(list(tmp_path.iterdir())) == 4
    torch.testing.assert_close(other["anchors"][2], first.get(0, examples[0][0])["anchors"][3])  # h_6 in both


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batched_layout_and_teacher_equal_one_sequence_at_a_time(family):
    """Right-padded batches (what a GPU needs) give every sequence the features and draft logits
    it gets alone: padding never reaches a real row."""
    n = 3
    target = StagedTarget(tiny_model(family), n)
    pdm = new_pdm(target, "tiny", "fp", num_layers=1, draft_vocab=torch.arange(10, 70))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 97, (length,), generator=g).tolist() for length in (17, 9, 23)]
    teacher = TeacherFeatures(target, pdm.cfg.anchors + [target.n_layers], None, "fp")
    batched = teacher.compute_batch(seqs)
    for s, b in zip(seqs, batched, strict=True):
        one = teacher.compute(s)
        torch.testing.assert_close(b["anchors"].float(), one["anchors"].float(), rtol=2e-3, atol=2e-3)
        assert torch.equal(b["best"], one["best"])
    with torch.no_grad():
        anchors = [[f["anchors"][teacher.anchors.index(j)].float() for j in pdm.cfg.anchors] for f in batched]
        S = max(map(len, seqs))
        padded = [torch.stack([torch.nn.functional.pad(a[i], (0, 0, 0, S - a[i].shape[0])) for a in anchors])
                  for i in range(len(pdm.cfg.anchors))]
        for k in range(1, n + 1):
            together = layout_logits(pdm, padded, k)
            for r, a in enumerate(anchors):
                alone = layout_logits(pdm, a, k)
                torch.testing.assert_close(together[r, : len(seqs[r])], alone, rtol=1e-4, atol=1e-4)


def test_micro_batches_give_the_same_loss_and_time_limit_stops_with_a_checkpoint(tmp_path):
    pdm, teacher, train_ex, val_ex, _ = setup_training(tmp_path)
    head = train_mod.TeacherHead(pdm)
    one = train_mod.evaluate(pdm, head, teacher, train_ex, 0, (0, 1), micro_batch=1)
    many = train_mod.evaluate(pdm, head, teacher, train_ex, 0, (0, 1), micro_batch=5)
    assert one["rows"] == many["rows"] and one["top1"] == pytest.approx(many["top1"])
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-4)
    settings = TrainSettings(epochs=50, lr=1e-3, warmup=1, batch_tokens=200, val_every=1000, save_every=1000,
                             micro_batch=4, time_limit=0.5)
    result = train(pdm, teacher, train_ex, val_ex, tmp_path / "run", settings, log=lambda *_: None)
    assert 0 < result["step"] < 50 * 5  # stopped by time, far before the 50 epochs
    state = torch.load(train_mod.checkpoint_dir(tmp_path / "run") / train_mod.STATE_FILE, weights_only=True)
    assert state["step"] == result["step"] and result["history"][-1]["step"] == result["step"]
    assert state["elapsed_s"] >= 0.5


def test_resume_is_atomic_and_its_schedule_continues(tmp_path, monkeypatch):
    """A checkpoint is written as a new directory that `latest` then names (one rename): a crash
    while writing the next leaves the last complete one to resume from. A time-limited run's
    elapsed time is carried: the resumed run's learning rate continues its decay, not restarts."""
    settings = TrainSettings(epochs=1, lr=1e-3, warmup=1, batch_tokens=200, val_every=1000, save_every=1)
    pdm, teacher, train_ex, val_ex, _ = setup_training(tmp_path)
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, f, *a, **k):  # the 3rd checkpoint dies half-written
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(train_mod.torch, "save", crashing_save)
    with pytest.raises(OSError):
        train(pdm, teacher, train_ex, val_ex, out, settings, log=lambda *_: None)
    monkeypatch.setattr(train_mod.torch, "save", real_save)
    found = train_mod.checkpoint_dir(out)
    assert found.name == "checkpoint-2" and torch.load(found / train_mod.STATE_FILE, weights_only=True)["step"] == 2
    assert not (out / "checkpoint-3").exists()  # the torn one never got its final name

    # The learning rate after a resume continues from the time already spent.
    timed = TrainSettings(epochs=1, lr=1e-3, warmup=1, batch_tokens=200, val_every=1000, save_every=1,
                          time_limit=1000.0)
    state = torch.load(found / train_mod.STATE_FILE, weights_only=True)
    torch.save({**state, "elapsed_s": 800.0}, found / train_mod.STATE_FILE)
    seen = []
    real_step = torch.optim.AdamW.step

    def record(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    pdm2, teacher2, *_ = setup_training(tmp_path)
    train(pdm2, teacher2, train_ex, val_ex, out, timed, resume=True, log=lambda *_: None)
    assert seen and seen[0] <= 1e-3 * (1 - 0.8) + 1e-9  # 80 % of the time spent: the decay is that far on


def test_regenerated_file_with_a_torn_last_line_is_read_up_to_it(tmp_path):
    from spdecode.training.features import read_regenerated

    f = tmp_path / "r.jsonl"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    f.write_text(json.dumps(conv) + "\n" + json.dumps({"messages": conv}) + "\n" + '[{"role": "us')
    assert read_regenerated(f) == [conv, conv]


def test_stream_parse_drops_the_truncated_tail():
    text = '[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},\n {"conv'
    rows = list(stream_json_array(text))
    assert len(rows) == 1
    assert normalise(rows[0]["conversations"]) == [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]
    assert normalise([{"from": "human", "value": "only a question"}]) is None
    # ...unless only the question is wanted (regeneration answers it).
    assert normalise([{"from": "human", "value": "only a question"}], need_answer=False) == [
        {"role": "user", "content": "only a question"}]


def test_conversation_files(tmp_path):
    from spdecode.data import load_conversations

    f = tmp_path / "c.jsonl"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    f.write_text(json.dumps(conv) + "\n" + json.dumps({"messages": conv[:1]}) + "\n")
    assert load_conversations(str(f)) == [conv]  # a bare list per line is a conversation too
    assert load_conversations(str(f), need_answer=False) == [conv, conv[:1]]
    with pytest.raises(SpdError, match="does not exist"):
        load_conversations(str(tmp_path / "missing.jsonl"))


def test_prompt_sets(tmp_path):
    rows = load_prompt_set("gsm8k", limit=3)
    assert len(rows) == 3 and rows[0]["turns"][0]
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"question_id": 7, "turns": ["Say hi."]}) + "\n")
    assert load_prompt_set(str(mine)) == [{"question_id": 7, "turns": ["Say hi."]}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no turns"}\n')
    with pytest.raises(SpdError, match="turns"):
        load_prompt_set(str(bad))
    with pytest.raises(SpdError, match="neither"):
        load_prompt_set("no_such_set")


@pytest.mark.integration
def test_an_over_long_prompt_is_shortened_in_its_text_not_its_template():
    from transformers import AutoTokenizer

    from spdecode.runtime.models import resolve_model
    from spdecode.runtime.prompts import template_ids
    from spdecode.training.features import fit_prompt

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    short = template_ids(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    text, ids = fit_prompt(tok, "hi", 64)
    assert (text, ids) == ("hi", short)
    text, ids = fit_prompt(tok, "word " * 500, 64)
    assert len(ids) <= 64 and ids[:3] == short[:3] and ids[-3:] == short[-3:]
    assert ids == template_ids(tok, [{"role": "user", "content": text}], add_generation_prompt=True)


def test_a_rewritten_prompt_file_gets_its_own_regeneration_cache(tmp_path):
    """The regenerated answers are keyed on the conversations themselves (and the model and dtype),
    not the file's name: the same name with other content (a file `data clean` rewrote) must not
    reuse, or resume from, the old answers."""
    from spdecode.data import load_conversations
    from spdecode.training.commands import regeneration_cache

    data = tmp_path / "prompts.jsonl"
    one = '{"conversations": [{"from": "human", "value": "first question"}, {"from": "gpt", "value": "a"}]}\n'
    two = '{"conversations": [{"from": "human", "value": "second question"}, {"from": "gpt", "value": "b"}]}\n'
    data.write_text(one + two)
    before = regeneration_cache(tmp_path, "m", "fp", load_conversations(str(data), None), "bfloat16")
    assert before == regeneration_cache(tmp_path, "m", "fp", load_conversations(str(data), None), "bfloat16")
    data.write_text(two)  # one removed, as `data clean` may
    after = regeneration_cache(tmp_path, "m", "fp", load_conversations(str(data), None), "bfloat16")
    assert after != before and after.parent == before.parent
    convs = load_conversations(str(data), None)
    assert regeneration_cache(tmp_path, "m", "other", convs, "bfloat16") != after  # another model's answers
    assert regeneration_cache(tmp_path, "m", "fp", convs, "float32") != after


def test_teacher_features_stay_in_host_memory_and_move_per_batch(tmp_path):
    """Every example's features are held on the CPU (pinned beside a GPU), not on the training
    device, where a larger target leaves no room for them; `select` moves one batch's worth."""
    pdm, teacher, train_ex, _, _ = setup_training(tmp_path)
    teacher.warm(train_ex[:3], batch_size=2)
    teacher.get(3, train_ex[3][0])
    assert teacher.pin is False  # a CPU target: nothing to pin
    assert all(v.device.type == "cpu" for f in teacher.memory.values() for v in f.values())
    got = teacher.select(teacher.memory[0], pdm.cfg.anchors, torch.float32)
    assert all(g.device == pdm.target[0].device and g.dtype == torch.float32 for g in got)
    # A GPU target's features would be pinned host copies (`_host` does so when `pin` is set).
    teacher.pin = True
    if torch.cuda.is_available():
        assert all(v.is_pinned() for v in teacher._host(teacher.memory[0]).values())
