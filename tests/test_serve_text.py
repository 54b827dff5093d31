"""serve/text.py: what a client sees streamed is exactly the final text, which is the decoded
tokens cut before the first stop string; no chunk ever holds a stop string or a broken character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spdecode.serve.text import TextStream


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from spdecode.runtime.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def stream(tok, ids, stops):
    s = TextStream(tok, stops)
    chunks = [s.feed(t) for t in ids]
    chunks.append(s.finish())
    return s, chunks


def test_a_stop_string_split_across_tokens_is_held_back_and_cut(tok):
    ids = list(tok("The answer is forty-two, said the machine.").input_ids)
    full = tok.decode(ids)
    s, chunks = stream(tok, ids, ["forty-two"])
    assert s.stopped and "".join(chunks) == full[:full.index("forty-two")] == s.text
    assert not any("forty" in c for c in chunks)


def test_multibyte_characters_are_never_shown_broken(tok):
    ids = list(tok("Grüße, 東京 and 🙂 emoji").input_ids)
    _, chunks = stream(tok, ids, [])
    assert "".join(chunks) == tok.decode(ids)
    assert not any("\ufffd" in c for c in chunks)


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(["the", "cat", " sat", "on", " mat", "\n", "ü", "🙂", "ab", "ba", "a"]),
                      min_size=1, max_size=25),
       stops=st.lists(st.sampled_from(["cat", "t s", "\n\n", "aba", "🙂", "mat\n", "zzz"]), max_size=3))
def test_streamed_text_is_the_text_cut_at_the_first_stop(tok, words, stops):
    ids = list(tok("".join(words)).input_ids)
    full = tok.decode(ids)
    s, chunks = stream(tok, ids, stops)
    # The earliest stop in the text of the tokens fed up to the one that completed it.
    hits = [full.find(x) for x in stops if x in full]
    expected = full[:min(hits)] if hits else full
    assert "".join(chunks) == expected == s.text
    assert s.stopped == bool(hits)
    assert not any(x in c for x in stops for c in chunks)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_streamed_text_equals_a_whole_decode_of_any_tokens(tok, data):
    """Incremental detokenization over windows gives exactly what decoding the whole answer gives,
    for arbitrary ids (broken UTF-8, lone spaces, special tokens among them)."""
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), min_size=1, max_size=40))
    _, chunks = stream(tok, ids, [])
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True)


class CountingTokenizer:
    """A tokenizer whose decode counts the ids it is given."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


def test_feed_decodes_a_bounded_window_not_the_whole_answer(tok):
    """TextStream.feed used to decode the whole answer at every token: O(n^2) on the one engine thread."""
    ids = list(tok("A long answer, word after word, with ü and 🙂 now and then. " * 60).input_ids)
    counting = CountingTokenizer(tok)
    s = TextStream(counting, ["never appears"])
    chunks = [s.feed(t) for t in ids] + [s.finish()]
    assert "".join(chunks) == tok.decode(ids)
    assert len(ids) > 1000 and counting.decoded < 20 * len(ids)


class OneCharTokenizer:
    """Token id i decodes to one character: a stream whose text is known, at no decoding cost."""

    def decode(self, ids, **kw):
        return "".join(chr(97 + i) for i in ids)


def test_stop_checks_read_each_character_once_not_every_prefix_of_every_stop():
    """Sixteen stop strings of 1,024 characters that the text keeps almost matching: the partial-match
    check used to try every prefix of every stop at every token (16 x 1,023 comparisons of up to
    1,023 characters per token). Count the calls made while feeding: they must not grow with the
    stops' length."""
    import sys

    stops = ["a" * 1023 + chr(98 + k) for k in range(16)]  # never completed by a text of a's
    s = TextStream(OneCharTokenizer(), stops)
    calls = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1

    sys.setprofile(profile)
    try:
        chunks = [s.feed(0) for _ in range(2000)]
    finally:
        sys.setprofile(None)
    assert "".join(chunks) == "a" * (2000 - 1023)  # the held-back tail could still become a stop
    assert calls[0] < 200 * 2000, calls[0]
