"""Exact stop strings over streamed text: find them across chunk boundaries, hold back what might
be the start of one, and never release a character that a stop string will later claim.

The rule is the one a character-by-character stream would give: generation ends at the first stop
string to *complete*; the output ends right before it. Ties (several stops ending at the same
character, e.g. "ab" and "b") go to the one that starts earliest. Because of that rule the result
does not depend on how the text was split into chunks.
"""
from __future__ import annotations

from typing import Iterable


class StopMatcher:
    """Feed text deltas; get back the text that is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))  # unique, in order
        self._longest = max((len(s) for s in self.stops), default=0)
        self._first_chars = frozenset(s[0] for s in self.stops)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def held(self) -> str:
        """Text withheld because it could be the start of a stop string."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text to emit now, stopped). After a stop every further feed returns ("", True)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        cut = self._find(buf)
        if cut is not None:
            self._held = ""
            self.stopped = True
            return buf[:cut], True
        keep = self._holdback(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """End of stream (no stop string came): release the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _find(self, buf: str) -> int | None:
        """Start of the stop string that completes first in buf (earliest end, then earliest start)."""
        best: tuple[int, int] | None = None
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0:
                key = (i + len(stop), i)
                if best is None or key < best:
                    best, self.matched = key, stop
        return None if best is None else best[1]

    def _holdback(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for i in range(max(0, len(buf) - self._longest + 1), len(buf)):
            if buf[i] in self._first_chars:
                tail = buf[i:]
                if any(stop.startswith(tail) for stop in self.stops):
                    return len(buf) - i
        return 0
