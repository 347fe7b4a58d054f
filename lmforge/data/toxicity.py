"""Toxicity scores for `lmforge clean`: a registry of classifiers and a word-list baseline.

The one idea: a classifier is any function (text, lang) -> score in [0, 1], registered under a
name, so a recipe moves from the bundled word lists to a model by naming it in
`clean.toxicity_classifier`. The built-in "wordlist" score is a density, listed terms per word,
so one stray swear word in a long article stays far below the cut while a short abusive message
is removed.

Register custom classifiers when a module is imported, not in a `__main__` block: the clean
workers are separate processes and only see what their imports register.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from lmforge.config import CleanConfig

Classifier = Callable[[str, "str | None"], float]

WORDLISTS = Path(__file__).with_name("wordlists")
HITS_AT_ONE = 0.04  # listed terms per word that score 1.0 (4 in 100 words; 2 in 100 score 0.5)
MIN_WORDS = 20  # a shorter text counts as this long: one listed word in it scores 1.0
CJK_CHARS_PER_WORD = 1.5  # a Chinese word is about 1.5 characters, to measure length in words

_EN_WORD = re.compile(r"[a-z]+")  # the English lists are ASCII; "f*ck" style spellings are missed
_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+")

_CLASSIFIERS: dict[str, Classifier] = {}


def register_classifier(name: str, fn: Classifier) -> None:
    """Make `fn(text, lang) -> score in [0, 1]` available as clean.toxicity_classifier = name.

    Registering a name again replaces the earlier function."""
    if not callable(fn):
        raise TypeError(f"toxicity classifier {name!r} must be callable, got {fn!r}")
    _CLASSIFIERS[name] = fn


def get_classifier(name: str) -> Classifier:
    try:
        return _CLASSIFIERS[name]
    except KeyError:
        raise ValueError(
            f"unknown toxicity classifier {name!r}; registered: {', '.join(sorted(_CLASSIFIERS))} "
            f"(add one with lmforge.data.toxicity.register_classifier)"
        ) from None


def read_wordlist(path: Path | str) -> list[str]:
    """The terms of a word list file: one per line, lower-cased; `#` starts a comment."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [t for t in (line.split("#", 1)[0].strip().lower() for line in lines) if t]


@lru_cache(maxsize=1)
def _matchers() -> tuple[frozenset[str], re.Pattern | None, re.Pattern]:
    en = read_wordlist(WORDLISTS / "toxic_en.txt")
    single = {t for t in en if " " not in t}
    words = frozenset(single | {t + "s" for t in single})  # plurals, found by a set lookup
    phrases = ["\\s+".join(map(re.escape, t.split())) for t in en if " " in t]
    phrase_re = re.compile(rf"\b(?:{'|'.join(phrases)})\b") if phrases else None
    # longest first: the regex takes the first alternative that matches, so 去你妈的 wins over 你妈的
    zh = sorted(read_wordlist(WORDLISTS / "toxic_zh.txt"), key=len, reverse=True)
    return words, phrase_re, re.compile("|".join(map(re.escape, zh)))


def wordlist_score(text: str, lang: str | None = None) -> float:
    """min(1, hits / (words x HITS_AT_ONE)): the density of listed English and Chinese terms.

    Both lists are always checked (`lang` is ignored): abuse is often code-switched. Length is
    English words plus Chinese characters / CJK_CHARS_PER_WORD, at least MIN_WORDS. So one hit
    in a 20-word message scores 1.0, in 50 words 0.5, in a 500-word article 0.05."""
    words, phrase_re, zh_re = _matchers()
    low = text.lower()
    en_words = _EN_WORD.findall(low)
    hits = sum(map(words.__contains__, en_words))
    if phrase_re is not None:
        hits += len(phrase_re.findall(low))
    n_han = 0
    if not text.isascii():
        hits += len(zh_re.findall(text))
        n_han = sum(map(len, _HAN.findall(text)))
    size = max(len(en_words) + n_han / CJK_CHARS_PER_WORD, MIN_WORDS)
    return min(1.0, hits / (size * HITS_AT_ONE))


register_classifier("wordlist", wordlist_score)


def toxicity_problem(text: str, cfg: CleanConfig, lang: str | None = None) -> str | None:
    """The rule name "toxic" when cfg.toxicity_classifier scores `text` at or above
    cfg.max_toxicity, else None. A score outside [0, 1] is a classifier bug and raises."""
    score = get_classifier(cfg.toxicity_classifier)(text, lang)
    if not 0.0 <= score <= 1.0:
        raise ValueError(
            f"toxicity classifier {cfg.toxicity_classifier!r} returned {score!r}, not in [0, 1]"
        )
    return "toxic" if score >= cfg.max_toxicity else None
