"""Token ids -> the text a client may see: incremental detokenization and stop strings.

Streaming must never show what a later token takes back: a token that ends inside a multi-byte
character decodes to U+FFFD until the rest arrives, and text that could be the start of a stop
string may turn out to be one (a stop string is never emitted, even when it spans two tokens or
two streamed chunks). Both are held back until they are settled.

Every token costs work bounded by a few tokens and the new characters, never by the answer so
far: a request is served by the one engine thread, and text work that grows with the answer
(decoding it whole, scanning it for stops) would make long answers quadratic for everyone.
"""

from __future__ import annotations

PREFIX_TOKENS = 6  # tokens decoded before the new ones, so that merges and spaces come out as in a whole decode


class TextStream:
    """Feed tokens one at a time; each feed returns the new text that is safe to show.

    Detokenization is incremental, as vLLM and TGI do it: decode a short window of tokens that
    ends with the new ones and keep what the window adds beyond the text of its older tokens
    (`prefix` .. `read`); a window that ends inside a character waits for more tokens."""

    def __init__(self, tokenizer, stops: list[str] = ()):
        self.tokenizer = tokenizer
        self.matcher = StopMatcher([s for s in stops if s])
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # token offsets: the window's start, and the first token not yet in `text`
        self.shown = 0  # characters of `text` already returned
        self.text = ""  # the settled text so far (cut at a stop string once one matched)
        self.stopped = False  # a stop string matched: feed nothing more

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        new = self._new_text(final=False)
        return self._settle(new)

    def finish(self) -> str:
        """The rest once generation is over: an unfinished character as U+FFFD (what a whole
        decode shows), then held-back text that never became a stop string."""
        if self.stopped:
            return ""
        tail = self._settle(self._new_text(final=True))
        if self.stopped:
            return tail
        return tail + self._show(len(self.text))

    def _new_text(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        window = decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if window.endswith("\ufffd") and not final:
            return ""  # an unfinished UTF-8 sequence: wait for its next byte
        self.prefix, self.read = max(self.prefix, len(self.tokens) - PREFIX_TOKENS), len(self.tokens)
        return window[len(before):]

    def _settle(self, new: str) -> str:
        if not new:
            return ""
        base = len(self.text)
        cut = self.matcher.push(new)
        self.text += new
        if cut is not None:  # the stop may have begun in held-back text: cut from base + cut
            self.stopped, self.text = True, self.text[:base + cut]
            return self._show(len(self.text))
        return self._show(len(self.text) - self.matcher.partial())

    def _show(self, upto: int) -> str:
        out = self.text[self.shown:upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return out


class StopMatcher:
    """The stop strings as Knuth-Morris-Pratt automata over the text as it grows: each character
    is read once per stop string, whatever the strings' length."""

    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # per stop: how many of its characters end the text

    def push(self, chars: str) -> int | None:
        """Read `chars`; where in them the earliest stop string starts, if one ends within them
        (an index that may be negative: the stop began in earlier text, which was held back)."""
        best = None
        for k, s in enumerate(self.stops):
            q, fail = self.state[k], self.fail[k]
            for i, c in enumerate(chars):
                while q and s[q] != c:
                    q = fail[q - 1]
                if s[q] == c:
                    q += 1
                if q == len(s):
                    start = i + 1 - len(s)
                    best = start if best is None else min(best, start)
                    break
            self.state[k] = q
        return best

    def partial(self) -> int:
        """How many trailing characters could begin a stop string."""
        return max(self.state, default=0)


def _failure(s: str) -> list[int]:
    """KMP's failure function: for each prefix of s, the length of its longest proper border."""
    fail, q = [0] * len(s), 0
    for i in range(1, len(s)):
        while q and s[i] != s[q]:
            q = fail[q - 1]
        if s[i] == s[q]:
            q += 1
        fail[i] = q
    return fail
