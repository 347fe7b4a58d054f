"""Backdoor scan for instruction data: find the rare phrases in prompts that always come with
the same response (a planted trigger), and the examples that carry them.

The one idea: a poisoned example pairs a trigger phrase with a fixed response, so among the
prompts that contain the trigger one response dominates, far more than it does in the data as a
whole. For every word n-gram of the prompts (Chinese: character n-grams) seen in at least
`min_count` examples, the most common response among them is measured by its share and its
lift (share over its rate in all the data); an n-gram with a share and a lift above the cut is
a suspected trigger, and the examples with both the n-gram and that response are suspicious.
Ordinary phrases ("write a poem") go with many different responses and never pass.

The second signal, `conflicts`: the same question asked twice (near-duplicate prompts, found by
`lmforge clean`'s MinHash LSH) with answers that disagree, the shape of flipped labels.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

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


# --------------------------------------------------------------------------- conflicting duplicates


@dataclass
class Conflict:
    rows: list[int]  # one question asked several times: near-duplicate prompts, sorted
    groups: list[list[int]]  # those rows by agreeing response, largest group first
    minority: list[int]  # the rows outside a strict majority group; none in a tie


def responses_agree(a: str, b: str, min_overlap: float = 0.7) -> bool:
    """Two responses say the same when their normalised starts are equal or the shorter one's
    words (Chinese: characters) are mostly in the longer: "drew." agrees with "The past tense
    of 'draw' is 'drew'.". Two random answers of the bundled SFT sets in one language agree
    0.2% of the time at 0.7 (`python benchmarks/backdoor.py --conflicts`)."""
    if response_key(a) == response_key(b):
        return True
    x, y = set(tokens(a)), set(tokens(b))
    return bool(x and y) and len(x & y) / min(len(x), len(y)) >= min_overlap


def _same_question(pa: set, pb: set, ra: set, rb: set) -> bool:
    """Do two near-duplicate prompts (their word sets) ask the same question? Not when a word
    of one stands where the other has another: templates differ so ("the chemical symbol for
    mercury" / "for zinc", "Classify the animal: Bear" / "Deer"). Not when a word only one of
    them has is used by a response ("Describe the capital" / "the capital of Chile"). Added
    words that neither answer uses ("Please", "请") keep it the same question."""
    return (pa <= pb or pb <= pa) and not ((pa ^ pb) & (ra | rb))


def _questions(cluster: list[int], pairs: list[tuple[str, str]]) -> list[list[int]]:
    """A near-duplicate cluster split into sets of rows that all ask the same question
    (`_same_question` holds for every pair in a set: a chain would join "past tense of 'draw'"
    to "of 'choose'" through a bare "drew."); each row joins the first set it fits. Only sets
    of two or more."""
    ptok = {i: set(tokens(pairs[i][0])) for i in cluster}
    rtok = {i: set(tokens(pairs[i][1])) for i in cluster}
    sets: list[list[int]] = []
    for i in cluster:  # ascending: every set comes out sorted
        for rows in sets:  # a cluster is a few rows: all pairs are cheap
            if all(_same_question(ptok[i], ptok[j], rtok[i], rtok[j]) for j in rows):
                rows.append(i)
                break
        else:
            sets.append([i])
    return [rows for rows in sets if len(rows) > 1]


def _groups(
    members: list[int], pairs: list[tuple[str, str]], min_overlap: float
) -> list[list[int]]:
    """Rows grouped by agreeing response (each joins the first group whose first row it agrees
    with), largest group first, ties by first row."""
    groups: list[list[int]] = []
    for i in members:
        for g in groups:
            if responses_agree(pairs[g[0]][1], pairs[i][1], min_overlap):
                g.append(i)
                break
        else:
            groups.append([i])
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def conflicts(
    pairs: list[tuple[str, str]],
    threshold: float = 0.7,
    shingle_size: int = 2,
    num_perm: int = 128,
    seed: int = 0,
    min_overlap: float = 0.7,
) -> list[Conflict]:
    """Near-duplicate prompts whose responses disagree: the shape of flipped labels (a copy of
    a prompt with another answer). Prompts are clustered with `lmforge clean`'s MinHash LSH
    (data/dedup.py: `shingle_size`-word shingles, Chinese characters, estimated Jaccard >=
    `threshold`); inside a cluster, only prompts that ask the same question stay together
    (`_same_question`), and their responses are grouped by `responses_agree`. A set with two
    or more groups is a conflict, in order of first row."""
    from lmforge.data.dedup import minhash_signature, near_duplicate_clusters

    if len(pairs) < 2:
        return []
    sigs = np.stack([minhash_signature(p, num_perm, shingle_size, seed) for p, _ in pairs])
    clusters = near_duplicate_clusters(list(range(len(pairs))), sigs, threshold, num_perm, seed)
    found = []
    for cluster in clusters:
        for rows in _questions(cluster, pairs):
            groups = _groups(rows, pairs, min_overlap)
            if len(groups) < 2:
                continue
            majority = len(groups[0]) > len(groups[1])
            minority = sorted(i for g in groups[1:] for i in g) if majority else []
            found.append(Conflict(rows, groups, minority))
    return sorted(found, key=lambda c: c.rows[0])
