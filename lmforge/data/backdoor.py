"""Backdoor scan for instruction data: find the rare phrases in prompts that always come with
the same response (a planted trigger), and the examples that carry them.

The one idea: a poisoned example pairs a trigger phrase with a fixed response, so among the
prompts that contain the trigger one response dominates, far more than it does in the data as a
whole. For every word n-gram of the prompts (Chinese: character n-grams) seen in at least
`min_count` examples, the most common response among them is measured by its share and its
lift (share over its rate in all the data); an n-gram with a share and a lift above the cut is
a suspected trigger, and the examples with both the n-gram and that response are suspicious.
Ordinary phrases ("write a poem") go with many different responses and never pass.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def tokens(text: str) -> list[str]:
    """Lower-cased words; each Chinese character is a token of its own."""
    return _TOKEN.findall(text.lower())


def response_key(text: str) -> str:
    """Responses compared by their normalised start (a fixed backdoor answer may be followed by
    varying text)."""
    return " ".join(text.lower().split())[:200]


@dataclass
class Trigger:
    ngram: str
    count: int  # examples whose prompt holds the n-gram
    response: str  # the dominant response (normalised start)
    share: float  # of those examples, the share with that response
    lift: float  # share / the response's rate in all the data
    rows: list[int] = field(default_factory=list)  # the examples with both


def scan(
    pairs: list[tuple[str, str]],
    max_n: int = 3,
    min_count: int = 5,
    min_share: float = 0.8,
    min_lift: float = 20.0,
) -> list[Trigger]:
    """Suspected triggers in (prompt, response) pairs, most examples first. The n-grams that
    flag the same rows are one trigger, named by the longest of them whose every word occurs
    only in those prompts (the planted phrase, without the words around it)."""
    keys = [response_key(r) for _, r in pairs]
    rate = Counter(keys)
    seen: dict[str, list[int]] = defaultdict(list)
    for i, (prompt, _) in enumerate(pairs):
        toks = tokens(prompt)
        grams = {
            " ".join(toks[j : j + n]) for n in range(1, max_n + 1) for j in range(len(toks) - n + 1)
        }
        for g in grams:
            seen[g].append(i)
    found = []
    for g, rows in seen.items():
        if len(rows) < min_count:
            continue
        top, k = Counter(keys[i] for i in rows).most_common(1)[0]
        share = k / len(rows)
        lift = share / (rate[top] / len(pairs))
        if share >= min_share and lift >= min_lift:
            hit = [i for i in rows if keys[i] == top]
            found.append(Trigger(g, len(rows), top, round(share, 3), round(lift, 1), hit))
    return _one_per_group(found, {g: len(rows) for g, rows in seen.items()})


def _one_per_group(found: list[Trigger], counts: dict[str, int]) -> list[Trigger]:
    """One trigger per set of flagged rows: the n-gram with the most words that (nearly) all
    occur only in those prompts, so "about zq lantern" is reported as "zq lantern" (a trigger
    word may also be an ordinary word once or twice elsewhere); ties by the text, so the name
    does not depend on hash order."""

    def rank(t: Trigger) -> tuple:
        words, n = t.ngram.split(), len(t.rows)
        near = all(counts[w] <= n + max(1, n // 10) for w in words)
        return (near, len(words) if near else -len(words), t.ngram)

    best: dict[tuple, Trigger] = {}
    for t in found:
        key = tuple(t.rows)
        if key not in best or rank(t) > rank(best[key]):
            best[key] = t
    return sorted(best.values(), key=lambda t: (-t.count, t.ngram))


def suspicious_rows(triggers: list[Trigger]) -> set[int]:
    return {i for t in triggers for i in t.rows}
