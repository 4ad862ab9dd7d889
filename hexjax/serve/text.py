"""Generated text of one request as its tokens come, with stop strings.

Text is always decoded from *all* the tokens generated so far, never token by
token: tokenizers merge spaces and multi-byte characters across tokens, so the
concatenation of per-token pieces is not the text.  What is sent is a prefix of
that text that can no longer change:

* text that may still be the start of a stop string is held back (a stop
  string that completes is cut off with everything after it, and never sent);
* a trailing replacement character (an unfinished multi-byte character of a
  byte-level tokenizer) is held back until the next token completes it.
"""

from __future__ import annotations

from typing import Callable, Sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest occurrence in ``text[start:]`` of any stop string, or -1."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that may still begin a stop string (or an unfinished character)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    tail = len(text) - hold
    while tail > 0 and text[tail - 1] == "\ufffd":
        tail -= 1
    return len(text) - tail


class TextStream:
    """Incremental text of one request: ``update(token_ids)`` after every token."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        """Text of every token so far (cut at a stop string once one is found)."""
        self.sent = 0
        """Characters of ``text`` handed out."""
        self.stopped = False

    def update(self, token_ids: list[int], stops: bool = True) -> bool:
        """Take the tokens generated so far; True when a stop string completed (the text is cut there).

        ``stops=False`` (before a request's ``min_tokens``) only follows the text.
        """
        if self.stopped:
            return True
        text = self.decode(token_ids)
        if self.stops and stops:
            # a new stop string ends in the new text (or in a just-completed character that was a
            # replacement character before): look back no further than it could start
            at = find_stop(text, self.stops, max(0, min(len(self.text), len(text)) - self.longest - 4))
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        return self.stopped

    def take(self, final: bool) -> str:
        """Text not yet handed out that is safe to send (all of it when ``final``)."""
        end = len(self.text) if final or self.stopped else len(self.text) - held_back(self.text, self.stops)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out
