"""Training data without a hub: near-duplicates and evaluation text kept out (`spdecode data
clean`), prompts the target writes itself (`spdecode data synth`), sampled answers that resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli

from spdecode.data import human_eval_records, load_prompt_set
from spdecode.training.clean import Contamination, clean, eval_texts, words


def conv(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


STORY = ("The little robot rolled across the kitchen floor every morning, collecting crumbs and humming an old "
         "song it had learned from the radio in the garage, until one day the radio stopped playing.")


def test_near_duplicates_go_and_distinct_conversations_stay():
    convs = [conv("Tell me a story about a robot.", STORY),
             conv("Tell me a story about a robot, please.", STORY.replace("playing.", "playing for good.")),
             conv("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
             conv("Write a haiku about rain.", STORY),  # another prompt, the same answer
             conv("Name a prime number.", "Seven is a prime number: its only divisors are one and itself."),
             conv("", "an answer to nothing"),
             # The same question answered another way (a sampled answer) is worth keeping.
             conv("What is the capital of France?", "Paris. It has been the capital since the Middle Ages.")]
    kept, report = clean(convs, Contamination([]))
    assert kept == [convs[0], convs[2], convs[4], convs[6]]
    assert (report.seen, report.kept, report.duplicate, report.empty, report.contaminated) == (7, 4, 2, 1, 0)


def test_a_conversation_sharing_thirteen_words_with_an_evaluation_text_goes():
    question = load_prompt_set("gsm8k")[0]["turns"][0]
    w = words(question)
    assert len(w) >= 14
    contamination = Contamination(eval_texts(["gsm8k"]))
    # 13 consecutive words of a GSM8K question, in another case and punctuation, inside other text.
    inside = "Here is a puzzle for you: " + ", ".join(w[:13]).upper() + " ... can you solve it?"
    twelve = "Here is a puzzle for you: " + " ".join(w[:12]) + " zebra quokka."
    assert contamination.hits(inside) and not contamination.hits(twelve)
    kept, report = clean([conv(inside, "An answer."), conv("A question.", twelve), conv("Q2", inside)], contamination)
    assert kept == [conv("A question.", twelve)] and report.contaminated == 2


def test_short_evaluation_turns_are_caught_by_8_grams_and_exact_matches():
    """The 13-gram rule cannot see an evaluation text under 13 words: 8-grams of those catch it
    inside other text, and a turn that is word for word a text under 8 words goes too."""
    short = "Write a C++ program to find the nth Fibonacci number using recursion."
    assert 8 <= len(words(short)) < 13
    tiny = "Who wrote Hamlet?"
    check = Contamination([short, tiny])
    kept, report = clean([conv("Please: write a c++ program to find the nth fibonacci number, thanks", "Sure."),
                          conv("Who wrote Hamlet?", "Shakespeare wrote it around 1600, in London."),
                          conv("Who wrote Hamlet? And why is it still read in schools today?", "It is rich."),
                          conv("Write a C++ program to print a triangle of stars.", "Here is one.")], check)
    assert report.by_rule == {"13-gram": 0, "8-gram": 1, "exact": 1}
    # Neither a longer question around a short text nor shared common words are removed.
    assert [c[0]["content"][:12] for c in kept] == ["Who wrote Ha", "Write a C++ "]
    assert "8-gram 1 (25.00%)" in report.line() and "exact 1 (25.00%)" in report.line()


def test_no_first_turn_of_the_evaluation_sets_survives_clean():
    check = Contamination(eval_texts(["mt_bench", "gsm8k", "humaneval"]))
    firsts = [row["turns"][0] for name in ("mt_bench", "gsm8k", "humaneval") for row in load_prompt_set(name)]
    kept, report = clean([conv(q, f"An answer of my own, number {i}.") for i, q in enumerate(firsts)], check)
    assert kept == [] and report.contaminated == len(firsts)
    assert report.by_rule["8-gram"] + report.by_rule["exact"] >= 4  # the short MT-Bench turns 13-grams miss


def test_plain_train_refuses_data_holding_evaluation_text(tmp_path, chat_model):
    from spdecode.runtime.errors import SpdError
    from spdecode.training.commands import TrainConfig, run_train

    _, _, path = chat_model
    question = load_prompt_set("mt_bench")[0]["turns"][0]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": conv(q, "An answer long enough to train on, really.")}) + "\n"
                            for q in ["Count to five.", question, "Name three colours."]))
    with pytest.raises(SpdError, match=r"1 of 3 training conversations .* `spdecode data clean"):
        run_train(TrainConfig(out=str(tmp_path / "draft"), model=str(path), stages=2, data=str(data), max_len=64,
                              draft_vocab="64", epochs=1))


def test_humaneval_solutions_and_tests_are_evaluation_text_too():
    texts = eval_texts(["humaneval"])
    solution = human_eval_records()[0]["canonical_solution"]
    assert solution in texts
    assert Contamination(texts).hits("def helper():\n" + solution * 2)


def test_data_clean_on_the_command_line(tmp_path, capsys):
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "mix.jsonl"
    a.write_text(json.dumps(conv("Tell me a story about a robot.", STORY)) + "\n")
    b.write_text(json.dumps({"messages": conv("Another robot story?", STORY)}) + "\n" +
                 json.dumps(conv("Why is the sky blue?", "Air scatters blue light more than red light.")) + "\n")
    res = subprocess.run([sys.executable, "-m", "spdecode", "data", "clean", "--data", f"{a},{b}", "--out", str(out),
                          "--eval", "mt_bench"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "3 conversations: 2 kept, 1 near-duplicates" in res.stdout
    assert [json.loads(line)["messages"][0]["content"] for line in out.read_text().splitlines()] == [
        "Tell me a story about a robot.", "Why is the sky blue?"]
    code, err = run_cli(capsys, "data", "clean", "--data", str(a), "--out", str(out), "--threshold", "0")
    assert code == 2 and "threshold" in err


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from serving import tiny_chat_model

    path = tmp_path_factory.mktemp("tiny-chat")
    return (*tiny_chat_model(path), path)


@pytest.mark.integration
def test_the_target_writes_prompts_from_topic_seeds_and_answers_them(tmp_path, capsys):
    """SmolLM2-Instruct given only its template up to the user's turn and a seed writes requests
    of that topic; `data synth` answers them; a rerun with a larger count goes on where it stopped."""
    from spdecode.training.synth import SEEDS, read_prompts

    out = tmp_path / "synth"
    args = [sys.executable, "-m", "spdecode", "data", "synth", "--out", str(out), "--topics", "math,python",
            "--batch-size", "4", "--max-new-tokens", "8", "--prompt-tokens", "48", "--seed", "1"]
    code, err = run_cli(capsys, *args[3:], "--count", "3")
    assert code == 0, err[-3000:]
    first = read_prompts(out / "prompts.jsonl")
    assert len(first) == 3
    for p in first:
        assert p["topic"] in ("math", "python") and p["prompt"].startswith(tuple(SEEDS[p["topic"]]))
        assert len(p["prompt"].split()) >= 4 and "<|im" not in p["prompt"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a[0]["content"] for a in answers] == [p["prompt"] for p in first] and all(a[1]["content"] for a in answers)
    code, err = run_cli(capsys, *args[3:], "--count", "5")
    assert code == 0, err[-3000:]
    more = read_prompts(out / "prompts.jsonl")
    assert len(more) == 5 and more[:3] == first and more[3]["batch"] > first[-1]["batch"]
    assert len((out / "answers.jsonl").read_text().splitlines()) == 5
    code, err = run_cli(capsys, *args[3:], "--count", "3", "--topics", "poetry")
    assert code == 2 and "unknown topics" in err


def test_sampled_answers_are_seeded_and_differ_from_greedy(chat_model, tmp_path):
    from spdecode.training.features import regenerate

    model, tok, _ = chat_model
    convs = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(4)]
    greedy = regenerate(model, tok, convs, tmp_path / "g.jsonl", max_new_tokens=8, batch_size=2)
    one = regenerate(model, tok, convs, tmp_path / "s1.jsonl", max_new_tokens=8, batch_size=2, temperature=1.0, seed=3)
    regenerate(model, tok, convs[:2], tmp_path / "s2.jsonl", max_new_tokens=8, batch_size=2, temperature=1.0, seed=3)
    two = regenerate(model, tok, convs, tmp_path / "s2.jsonl", max_new_tokens=8, batch_size=2, temperature=1.0, seed=3)
    assert one == two  # an interrupted run, resumed, draws what a straight one does
    assert one != greedy


def test_training_with_a_bfloat16_teacher_and_the_topk_term(chat_model, tmp_path):
    """`train --teacher-dtype bfloat16 --topk K`: the teacher pass runs in bfloat16 (its features are
    cached under that dtype) while the draft trains in float32 with the extra term; a negative K is
    refused before anything loads."""
    from spdecode.runtime.errors import SpdError
    from spdecode.runtime.models import load_model, weights_fingerprint
    from spdecode.runtime.staged import StagedTarget
    from spdecode.training.commands import TrainConfig, examples_from, run_train
    from spdecode.training.features import TeacherFeatures

    _, tok, path = chat_model
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                                     {"role": "assistant", "content": " ".join(map(str, range(i)))}]})
                            + "\n" for i in range(3, 11)))
    cfg = TrainConfig(out=str(tmp_path / "draft"), model=str(path), stages=2, data=str(data), limit=None, max_len=64,
                      draft_vocab="64", teacher_dtype="bfloat16", cache_dir=str(tmp_path / "cache"), topk=5,
                      epochs=2, batch_tokens=64, val_every=1000, save_every=1000, val_frac=0.25)
    assert run_train(cfg) == 0
    anchors = json.loads((tmp_path / "draft" / "pdm_config.json").read_text())["anchors"]
    half, _ = load_model(str(path), "bfloat16", "cpu")
    teacher = TeacherFeatures(StagedTarget(half, 2), anchors + [half.config.num_hidden_layers], tmp_path / "cache",
                              weights_fingerprint(half))
    examples = examples_from(tok, str(data), None, 64)
    assert all(teacher._path(ids).exists() for ids, _ in examples)  # features of a bfloat16 pass, one per sequence
    history = json.loads((tmp_path / "draft" / "train_log.json").read_text())
    assert history["settings"]["topk"] == 5 and history["step"] > 0
    with pytest.raises(SpdError, match="--topk"):
        run_train(TrainConfig(out=str(tmp_path / "other"), model=str(path), data=str(data), topk=-1))
