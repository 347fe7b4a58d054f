"""Sentence BLEU and ROUGE-1/2/L of one answer against one reference, in plain Python: the
numbers lm-evaluation-harness's TruthfulQA generation task gets from sacrebleu and rouge-score.

The one idea: TruthfulQA's automatic metrics compare one short answer with one short reference at
a time, so the whole metric is a few n-gram counts and one longest common subsequence. Written
out here they need no optional package (similarity.py, which scores corpora, does use sacrebleu
and rouge-score), and tests/eval/test_overlap.py checks them against those two libraries.

- BLEU (0-100): sacrebleu's `corpus_bleu([hyp], [[ref]])` as lm-eval calls it: "intl"
  tokenisation (mteval-v14's international rules), case kept, orders 1-4, the "exp" (NIST)
  smoothing of zero-match orders, no effective order, so an answer of fewer than four tokens
  scores 0.
- ROUGE (0-100, F-measure): rouge-score's default tokenizer (lower case, runs of [a-z0-9] only,
  no stemming). lm-eval's ROUGE-L is `rougeLsum`, which splits texts at newlines; for one-line
  texts it equals the plain LCS score computed here (a text here is one token sequence, whatever
  its lines).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

_ROUGE_SPLIT = re.compile(r"[^a-z0-9]+")


def _cat(ch: str) -> str:
    return unicodedata.category(ch)[0]  # "P" punctuation, "S" symbol, "N" number, ...


def _pair_sub(text: str, match, repl) -> str:
    """One left-to-right pass replacing non-overlapping character pairs (a, b) with match(a, b)
    true by repl(a, b): what re.sub does with a two-character pattern."""
    out, i = [], 0
    while i < len(text):
        if i + 1 < len(text) and match(text[i], text[i + 1]):
            out.append(repl(text[i], text[i + 1]))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def bleu_tokens(text: str) -> list[str]:
    """sacrebleu's "intl" tokens: punctuation is split off unless a digit stands on the side
    that would be cut ("3.5" and "1,000" stay whole), every symbol is split off."""
    text = _pair_sub(text.rstrip(), lambda a, b: _cat(a) != "N" and _cat(b) == "P",
                     lambda a, b: f"{a} {b} ")  # fmt: skip
    text = _pair_sub(text, lambda a, b: _cat(a) == "P" and _cat(b) != "N",
                     lambda a, b: f" {a} {b}")  # fmt: skip
    text = "".join(f" {c} " if _cat(c) == "S" else c for c in text)
    return text.split()


def _ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def sentence_bleu(hypothesis: str, reference: str, max_n: int = 4) -> float:
    """BLEU (0-100) of one hypothesis against one reference (see the module docstring)."""
    hyp, ref = bleu_tokens(hypothesis), bleu_tokens(reference)
    if len(hyp) < max_n:  # an order with no n-grams has precision 0: log 0 zeroes the score
        return 0.0
    correct = [sum((_ngrams(hyp, n) & _ngrams(ref, n)).values()) for n in range(1, max_n + 1)]
    if not any(correct):
        return 0.0
    log_p, halvings = 0.0, 1.0
    for n, c in enumerate(correct, start=1):
        total = len(hyp) - n + 1
        if c == 0:  # NIST smoothing: 1 / (2^k * total) for the k-th order without a match
            halvings *= 2
            log_p += math.log(100.0 / (halvings * total))
        else:
            log_p += math.log(100.0 * c / total)
    bp = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(log_p / max_n)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokens: lower case, runs of ASCII letters and digits."""
    return [t for t in _ROUGE_SPLIT.split(text.lower()) if t]


def _f(overlap: int, n_hyp: int, n_ref: int) -> float:
    p, r = overlap / max(n_hyp, 1), overlap / max(n_ref, 1)
    return 100.0 * 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_n(hypothesis: str, reference: str, n: int) -> float:
    """ROUGE-n F-measure (0-100): clipped n-gram overlap."""
    hyp, ref = _ngrams(rouge_tokens(hypothesis), n), _ngrams(rouge_tokens(reference), n)
    return _f(sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values()))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure (0-100): the longest common subsequence of tokens."""
    hyp, ref = rouge_tokens(hypothesis), rouge_tokens(reference)
    if not hyp or not ref:
        return 0.0
    return _f(_lcs(hyp, ref), len(hyp), len(ref))
