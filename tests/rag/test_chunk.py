"""Chunking: whole sentences, at most max_tokens, the promised overlap, Chinese sentence ends."""

from __future__ import annotations

import pytest

from lmforge.rag.chunk import chunk_spans, count_words, sentence_spans


def test_sentences_english_and_chinese():
    text = 'One fish. "Two?" Red fish!\n\nno stop here\n\n长江很长。黄河也长！好'
    got = [text[s:e] for s, e in sentence_spans(text)]
    assert got == [
        "One fish.",
        '"Two?"',
        "Red fish!",
        "no stop here",
        "长江很长。",
        "黄河也长！",
        "好",
    ]


def test_chunks_respect_bounds_and_overlap():
    # made-up text: 30 sentences of 6 tokens each (5 words and the full stop)
    text = " ".join(f"Sentence number {k} is here." for k in range(30))
    spans = chunk_spans(text, max_tokens=20, overlap=6)
    sents = sentence_spans(text)
    starts, ends = {s for s, _ in sents}, {e for _, e in sents}
    for s, e in spans:
        assert count_words(text[s:e]) <= 20
        assert s in starts and e in ends  # on sentence bounds
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (s1, e1), (s2, _) in zip(spans, spans[1:]):
        assert s1 < s2 <= e1  # each chunk moves on and overlaps the previous one
        assert count_words(text[s2:e1]) <= 6
    # 6 tokens per sentence: 3 per chunk, 1 repeated
    assert [count_words(text[s:e]) for s, e in spans[:2]] == [18, 18]
    assert spans[1][0] == sents[2][0]


def test_long_sentence_is_split_and_chinese_counts_characters():
    text = "word " * 50
    spans = chunk_spans(text.strip(), max_tokens=10, overlap=0)
    assert len(spans) == 5 and all(count_words(text[s:e]) == 10 for s, e in spans)
    zh = "长江是中国最长的河流。" * 6  # 11 tokens a sentence (10 characters and 。)
    spans = chunk_spans(zh, max_tokens=25, overlap=11)
    assert [zh[s:e] for s, e in spans][:2] == ["长江是中国最长的河流。" * 2] * 2
    assert spans[1][0] == 11


def test_bad_settings_named():
    with pytest.raises(ValueError, match="overlap < max_tokens"):
        chunk_spans("a b c", max_tokens=5, overlap=5)
