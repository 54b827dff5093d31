"""Token ids -> the text a client may see: incremental detokenization and stop strings.

Streaming must never show what a later token takes back: a token that ends inside a multi-byte
character decodes to U+FFFD until the rest arrives, and text that could be the start of a stop
string may turn out to be one (a stop string is never emitted, even when it spans two tokens or
two streamed chunks). Both are held back until they are settled.
"""

from __future__ import annotations


class TextStream:
    """Feed tokens one at a time; each feed returns the new text that is safe to show."""

    def __init__(self, tokenizer, stops: list[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.shown = 0  # characters of the decoded text already returned
        self.text = ""  # the decoded text so far (cut at a stop string once one matched)
        self.stopped = False  # a stop string matched: feed nothing more

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped, self.text = True, text[:cut]
            return self._show(cut)
        self.text = text
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
            return ""
        return self._show(len(text) - self._partial_stop(text))

    def finish(self) -> str:
        """The rest once generation is over (held-back text that never became a stop string)."""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        out = self.text[self.shown:upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return out

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts, searching only text that is new or held back."""
        hits = [i for s in self.stops if (i := text.find(s, max(0, self.shown - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, text: str) -> int:
        """How many trailing characters could begin a stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
