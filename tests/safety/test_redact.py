"""--redact-pii's streaming filter: whatever the pieces, the output is scrub_pii of the whole text,
and text with no PII passes through unchanged and without waiting for the end."""

import itertools
import json
from pathlib import Path

import pytest

from lmforge.data.pii import scrub_pii
from lmforge.safety.redact import MAX_HOLD, PIIRedactor, held_from

# made up for the test: reserved example domains, 555 numbers, test card and ID numbers
TEXTS = [
    "Write to zhang.san@example.com or call +1 415-555-0132 today.",
    "My card is 4111 1111 1111 1111, my phone 13800138000, IP 192.168.1.20.",
    "请发邮件到li.si@example.org联系，电话 (0755) 12345678。",
    "Version 3.10.2.1 and 2023-10-01 are not PII; ssn 123-45-6789 is.",
    "ends with an address: bob@example.net",
]


def streamed(text: str, pieces: list[int]) -> list[str]:
    r, out, pos = PIIRedactor(), [], 0
    for cut in pieces:
        out.append(r.feed(text[pos:cut]))
        pos = cut
    out.append(r.feed(text[pos:]) + r.finish())
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_every_two_piece_split_equals_whole_text_scrub(text):
    want = scrub_pii(text)[0]
    assert "<" in want  # each text holds PII the rules find
    for cut in range(len(text) + 1):
        assert "".join(streamed(text, [cut])) == want, cut


@pytest.mark.parametrize("text", TEXTS)
def test_character_by_character_equals_whole_text_scrub(text):
    assert "".join(streamed(text, list(range(1, len(text))))) == scrub_pii(text)[0]


def test_email_split_across_pieces_never_leaks():
    # made up: the address arrives in three pieces; no piece released holds any of it
    out = streamed("mail zhang.san@example.com now", [8, 18])
    assert out[0] == "mail " and out[1] == ""
    assert "".join(out) == "mail <EMAIL> now"


def test_phone_split_across_pieces():
    out = streamed("call +1 415-555-0132 please", [8, 14])  # made-up number
    assert "".join(out) == "call <PHONE> please"
    assert not any("415" in piece or "0132" in piece for piece in out)


def test_plain_text_streams_unchanged_and_promptly():
    text = "The quick brown fox jumps over the lazy dog, 3 times. 你好，世界。"
    words = [i + 1 for i, c in enumerate(text) if c == " "]
    out = streamed(text, words)
    assert "".join(out) == text
    # each piece ends in a space, nothing can still grow: it is released at once
    assert out[:3] == ["The ", "quick ", "brown "]


def test_hold_is_bounded():
    assert held_from("x" * 1000) == 1000 - MAX_HOLD
    assert held_from("no tail here ") == len("no tail here ")


def test_labelled_pii_set_streamed_in_uneven_pieces():
    """The data cleaner's hand-labelled set (164 lines, look-alikes included), each line streamed
    in pieces of 1, 2, 3, 5 and 7 characters in turn: the same text as scrubbing it whole."""
    path = Path(__file__).resolve().parents[1] / "data" / "pii_labelled.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    assert len(rows) > 100
    for row in rows:
        text, cuts, pos = row["text"], [], 0
        for size in itertools.cycle((1, 2, 3, 5, 7)):
            pos += size
            if pos >= len(text):
                break
            cuts.append(pos)
        assert "".join(streamed(text, cuts)) == scrub_pii(text)[0], text
