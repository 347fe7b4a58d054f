"""Chunking: documents cut into passages of at most `max_tokens` tokens on sentence bounds,
with about `overlap` tokens repeated between neighbours so a fact split across a boundary is
still whole in one chunk.

A chunk is a span of the document, (start, end) character offsets: its text is always
`text[start:end]`, which is what lets a citation point back into the source."""

from __future__ import annotations

import re
from collections.abc import Callable

# English ends (. ! ? followed by space), Chinese/Japanese full-width ends (no space follows
# them), and blank lines (a paragraph end even without punctuation)
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|(?<=[。！？；])[”’」』）]*\s*|\n\s*\n")
# the default token count: a word, a number, one CJK character or one punctuation mark is a
# token (close to what a WordPiece or BPE tokenizer counts for English; used when no encoder
# tokenizer is given)
WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+|[^\w\s]", re.UNICODE)


def count_words(text: str) -> int:
    """The default token count (see WORD)."""
    return len(WORD.findall(text))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, trailing whitespace excluded; blank text gives []."""
    spans, start = [], 0
    for m in SENTENCE_END.finditer(text):
        spans.append((start, m.start() + len(m.group().rstrip())))  # keep a closing quote
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:  # trim whitespace so offsets land on text
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


def split_long(
    text: str, span: tuple[int, int], max_tokens: int, count: Callable[[str], int]
) -> list[tuple[int, int]]:
    """A sentence longer than max_tokens, cut at word (or CJK character) bounds."""
    pieces, start, last = [], span[0], span[0]
    for m in WORD.finditer(text, span[0], span[1]):
        if m.end() > start and count(text[start : m.end()]) > max_tokens and last > start:
            pieces.append((start, last))
            start = m.start()
        last = m.end()
    pieces.append((start, span[1]))
    return pieces


def chunk_spans(
    text: str,
    max_tokens: int = 200,
    overlap: int = 40,
    count: Callable[[str], int] = count_words,
) -> list[tuple[int, int]]:
    """Pack whole sentences into chunks of at most max_tokens; the next chunk starts with the
    last sentences of this one that fit in `overlap` tokens (never all of them, so it moves on)."""
    if max_tokens < 1 or not 0 <= overlap < max_tokens:
        raise ValueError(
            f"chunking needs max_tokens >= 1 and 0 <= overlap < max_tokens, got {max_tokens}, {overlap}"
        )
    sents = []
    for span in sentence_spans(text):
        sents += split_long(text, span, max_tokens, count)
    size = [count(text[s:e]) for s, e in sents]
    chunks, i = [], 0
    while i < len(sents):
        j, total = i, size[i]
        while j + 1 < len(sents) and total + size[j + 1] <= max_tokens:
            j += 1
            total += size[j]
        chunks.append((sents[i][0], sents[j][1]))
        if j + 1 >= len(sents):
            break
        k, back = j + 1, 0  # walk back from the end while the tail fits in `overlap`
        while k - 1 > i and back + size[k - 1] <= overlap:
            k -= 1
            back += size[k]
        i = k
    return chunks
