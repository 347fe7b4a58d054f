"""PII redaction of a model's output as it streams (`lmforge serve --redact-pii`): the rules of
lmforge/data/pii.py, applied to text that arrives a few characters at a time.

The one idea: every PII match is made of a small set of characters (an e-mail, IP or ID of
letters, digits and `._%+-@:`, with no space; a phone or card number of digits, spaces and
`+-.()`), so a match still being written can only be the text's trailing run of those
characters. Everything before that run is final: it is scrubbed and released; the run is held
until a character that cannot continue it arrives, or the stream ends. The run is capped at
MAX_HOLD characters, so a client never waits on an unbounded tail. Streamed in any pieces, the
output equals `scrub_pii` of the whole text (tests/safety/test_redact.py checks every split).
"""

from __future__ import annotations

import re

from lmforge.data.pii import PLACEHOLDERS, find_pii

# the trailing run a match may still be growing into: a word-like run with no space (e-mails,
# IPs, IDs, phone numbers written without spaces) or a number with spaces (cards, phones)
_WORD_TAIL = re.compile(r"[A-Za-z0-9_%+\-.@:]*\Z", re.ASCII)
_NUMBER_TAIL = re.compile(r"(?:[+(（0-9][0-9 +\-.()（）]*)?\Z")
# the pii rules look at most this far back (the version-word veto before an IP: 12 characters)
CONTEXT = 16
MAX_HOLD = 256  # longer than any e-mail address (254) or number the rules accept


def held_from(text: str) -> int:
    """Where the tail that a PII match could still be growing into starts."""
    start = min(_WORD_TAIL.search(text).start(), _NUMBER_TAIL.search(text).start())
    return max(start, len(text) - MAX_HOLD)


class PIIRedactor:
    """feed(piece) -> the text that is final, scrubbed; finish() -> the rest, scrubbed."""

    def __init__(self, types=tuple(PLACEHOLDERS)):
        self.types = types
        self.pending = ""  # received, not yet released
        self.context = ""  # the last released characters, unscrubbed: lookbehinds read them

    def feed(self, piece: str) -> str:
        self.pending += piece
        return self._release(held_from(self.pending))

    def finish(self) -> str:
        return self._release(len(self.pending))

    def _release(self, cut: int) -> str:
        text = self.context + self.pending
        n = len(self.context)
        spans = [s for s in find_pii(text, self.types) if s[0] >= n]
        # a match the cut would split waits whole (a safety net: the tail rule should see it)
        for start, end, _ in spans:
            if start < n + cut < end:
                cut = start - n
        out, pos = [], n
        for start, end, kind in spans:
            if end <= n + cut:
                out += [text[pos:start], PLACEHOLDERS[kind]]
                pos = end
        out.append(text[pos : n + cut])
        self.context = text[max(0, n + cut - CONTEXT) : n + cut]
        self.pending = self.pending[cut:]
        return "".join(out)
