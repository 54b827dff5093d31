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
