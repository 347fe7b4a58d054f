"""Dedup: exact keys collide only on formatting variants, signatures are the same in every process,
and near-duplicate clusters find planted copies of real documents (pairwise recall and precision
against the ground truth) without merging documents that only share a topic or boilerplate."""

import gzip
import itertools
import json
import random
import re
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from datasketch import LeanMinHash

from lmforge.data.dedup import (
    SCHEME,
    cluster_report,
    exact_duplicates,
    exact_key,
    minhash_signature,
    near_duplicate_clusters,
    shingles,
)

REPO = Path(__file__).resolve().parents[2]
ZH = "话说大宋仁宗天子在位，嘉祐三年三月三日五更三点，天子驾坐紫宸殿，受百官朝贺。"

# --------------------------------------------------------------------------- exact keys


def test_exact_key_collides_on_formatting_only():
    text = "The quick brown fox -- jumps over the lazy dog.\nIt was 1999!"
    variants = [
        "the QUICK brown fox jumps over the lazy dog   it was 1999",
        "  The quick brown fox — jumps over the lazy dog.\r\n\r\nIt was “1999”!  ",
        "The quick brown fox jumps over the lazy dog. • It was １９９９!",  # full-width digits: NFKC
    ]
    assert all(exact_key(v) == exact_key(text) for v in variants)
    assert exact_key(text.replace("lazy", "lazier")) != exact_key(text)
    assert exact_key(text.replace("1999", "1998")) != exact_key(text)
    assert len(exact_key(text)) == 16

    zh_variants = [ZH.replace("，", ", ").replace("。", "."), " ".join(ZH), ZH + "\n"]
    assert all(exact_key(v) == exact_key(ZH) for v in zh_variants)
    assert exact_key(ZH.replace("三月", "四月")) != exact_key(ZH)


def test_exact_duplicates_keeps_first_occurrence():
    texts = ["a b c", "x y z", "A, B, C!", "x y z w", "xyz"]
    keys = [exact_key(t) for t in texts]
    expected = [False, False, True, False, True]  # "xyz" repeats "x y z": spaces are formatting
    assert exact_duplicates(keys).tolist() == expected
    as_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16)
    assert exact_duplicates(as_array).tolist() == expected
    assert exact_duplicates([]).tolist() == []


# --------------------------------------------------------------------------- shingles, signatures


def test_shingles_words_and_characters():
    assert shingles("The cat, the HAT; the bat.", 2) == {
        "the cat",
        "cat the",
        "the hat",
        "hat the",
        "the bat",
    }
    assert shingles("U.S. don't", 1) == {"us", "dont"}
    assert shingles("他说：OK，我们走吧。", 4) == {
        "他说ok",
        "说ok我",
        "ok我们",
        "k我们走",
        "我们走吧",
    }
    assert shingles("天子驾坐，紫宸殿。", 3) == {"天子驾", "子驾坐", "驾坐紫", "坐紫宸", "紫宸殿"}
    # shorter than one shingle: one shingle of the whole text
    assert shingles("Hello,   World!", 5) == {"hello world"}
    assert shingles("紫宸殿", 5) == {"紫宸殿"}
    assert shingles("", 5) == {""}


def test_signature_deterministic_across_processes():
    text = _enwiki()[0]
    sig = minhash_signature(text, 64, 5, seed=7)
    assert sig.shape == (64,) and sig.dtype == np.uint32
    assert np.array_equal(sig, minhash_signature(text, 64, 5, seed=7))
    assert not np.array_equal(sig, minhash_signature(text, 64, 5, seed=8))
    code = (
        "import sys; from lmforge.data.dedup import minhash_signature; "
        "print(minhash_signature(sys.stdin.read(), 64, 5, 7).tolist())"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=text,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(out.stdout) == sig.tolist()


def test_signature_estimates_jaccard():
    """Estimated similarity of a document and a lightly edited copy is within MinHash's error
    (std sqrt(J(1-J)/num_perm) ~ 0.03 at 256) of the true Jaccard of the shingle sets."""
    rng = random.Random(0)
    errors = []
    for text in _enwiki()[:30]:
        words = text.split()
        copy = " ".join(w if rng.random() > 0.04 else rng.choice(words) for w in words)
        a, b = shingles(text, 5), shingles(copy, 5)
        true = len(a & b) / len(a | b)
        sa, sb = (minhash_signature(t, 256, 5, 1) for t in (text, copy))
        errors.append(float((sa == sb).mean()) - true)
    assert abs(np.mean(errors)) < 0.02 and np.sqrt(np.mean(np.square(errors))) < 0.05


# --------------------------------------------------------------------------- clusters


def test_clusters_small_example():
    base = _enwiki()[:6]
    texts = [base[0], base[1], base[0].upper(), base[2], base[1] + " Share this.", base[3]]
    sigs = np.stack([minhash_signature(t, 128, 5, 1) for t in texts])
    clusters = near_duplicate_clusters([f"d{i}" for i in range(6)], sigs, 0.8, 128, 1)
    assert clusters == [[0, 2], [1, 4]]
    # the driver passes uint64; the verification is MinHash.jaccard's estimate
    assert near_duplicate_clusters(list(range(6)), sigs.astype(np.uint64), 0.8, 128, 1) == clusters
    a, b = (LeanMinHash(seed=1, hashvalues=sigs[i], scheme=SCHEME) for i in (1, 4))
    assert a.jaccard(b) == float((sigs[1] == sigs[4]).mean())
    assert near_duplicate_clusters([], np.zeros((0, 128), np.uint32), 0.8, 128, 1) == []
    with pytest.raises(ValueError, match="d0"):
        near_duplicate_clusters(["d0"] * 6, sigs, 0.8, 128, 1)


def test_cluster_report_shape():
    texts = ["first  text\nof cluster one " * 10, "copy", "other", "x", "y", "z"]
    report = cluster_report([[0, 1], [2, 3, 4]], texts, max_clusters=1)
    assert report["clusters"] == 2 and report["duplicates"] == 3
    assert report["size_histogram"] == {"2": 1, "3": 1}
    assert report["examples"] == [
        {"size": 3, "members": [2, 3, 4], "snippets": ["other", "x", "y"]}
    ]
    report = cluster_report([[0, 1]], lambda i: texts[i])
    snippet = report["examples"][0]["snippets"][0]
    assert len(snippet) == 80 and snippet.startswith("first text of cluster one first")
    json.dumps(report)


# --------------------------------------------------------------------------- planted near-duplicates

BOILERPLATE_EN = [
    "Share this article on social media.",
    "This page was last edited on 3 May 2021, at 14:02.",
    "Text is available under the Creative Commons Attribution-ShareAlike License.",
    "Click here to subscribe to our newsletter.",
]
BOILERPLATE_ZH = [
    "本文来源于网络，版权归原作者所有。",
    "点击这里阅读全文。",
    "欢迎关注我们的公众号。",
]
TEMPLATE_EN = (
    "Home | News | Sport | Culture | Contact us. Welcome to the community encyclopedia, the free "
    "reference that anyone can edit. The content below is provided for general information only and "
    "may be out of date; please check the original sources before relying on it. Found an error? "
    "Let us know through the feedback form at the bottom of the page.\n"
)
TEMPLATE_ZH = (
    "首页 | 新闻 | 文学 | 联系我们。欢迎来到古典文学阅读网，本站所有作品均来自网友上传，"
    "仅供学习交流使用，请勿用于商业用途。如果发现错误，请通过页面底部的反馈表告诉我们。\n"
)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])")


@lru_cache(maxsize=1)
def _enwiki() -> list[str]:
    """Enwiki articles of 50 words to 5,000 characters, in file order."""
    out = []
    with gzip.open(REPO / "datasets/enwiki/enwiki_extract_train_head6000.jsonl.gz", "rt") as f:
        for line in itertools.islice(f, 600):
            text = json.loads(line)["text"]
            if len(text.split()) >= 50 and len(text) <= 5000:
                out.append(text)
    return out


@lru_cache(maxsize=1)
def _zh_paragraphs() -> list[str]:
    """Consecutive lines of the four novels joined into 300-800 character paragraphs: neighbours
    share characters, names and style, which makes them realistic non-duplicates."""
    rng, out = random.Random(0), []
    for path in sorted((REPO / "datasets/chinese").glob("novel_*.txt.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = [s.strip() for s in itertools.islice(f, 300, 3000) if s.strip()]
        target, chunk, paragraphs = rng.randint(300, 800), "", []
        for line in lines:
            chunk += line + "\n"
            if len(chunk) >= target:
                paragraphs.append(chunk[:800].strip())
                target, chunk = rng.randint(300, 800), ""
        out += paragraphs[:19]
    return out


def _distinct(texts: list[str], max_jaccard: float = 0.3) -> list[str]:
    """`texts` without any that share more than `max_jaccard` of their 3-shingles with an earlier
    one. The real data has templated stubs (seven Korean ice hockey players, two Ontario ridings,
    Jaccard up to 0.8: more alike than a copy with 5% of its words edited), which no similarity
    threshold can tell from planted copies; unlabelled, they would only blur the measurement."""
    kept, postings = [], {}  # postings: shingle -> positions in kept
    for text in texts:
        mine = shingles(text, 3)
        shared = Counter(j for s in mine for j in postings.get(s, ()))
        if any(c / (len(mine) + len(kept[j][1]) - c) > max_jaccard for j, c in shared.items()):
            continue
        for s in mine:
            postings.setdefault(s, []).append(len(kept))
        kept.append((text, mine))
    return [t for t, _ in kept]


def _near_copy(text: str, rng: random.Random, cjk: bool, rate: float | None = None) -> str:
    """A copy with random edits: 3-8% of words (characters for CJK) substituted, deleted or
    inserted; maybe 1-2 swapped sentence pairs, a boilerplate line added or a short line removed,
    and whitespace or case changed."""
    if rng.random() < 0.5:  # swap 1-2 sentence pairs
        parts = _SENTENCE_END.split(text)
        for _ in range(rng.randint(1, 2)):
            i, j = rng.randrange(len(parts)), rng.randrange(len(parts))
            parts[i], parts[j] = parts[j], parts[i]
        text = "".join(parts)
    rate = rng.uniform(0.03, 0.08) if rate is None else rate
    if cjk:
        chars = [c for c in text if not c.isspace()]
        text = "".join(_edit_tokens(list(text), rate, rng, chars))
    else:
        text = "\n".join(
            " ".join(_edit_tokens(line.split(" "), rate, rng, text.split()))
            for line in text.split("\n")
        )
    lines = text.split("\n")
    short = [i for i, line in enumerate(lines) if 0 < len(line) < 60]
    if short and rng.random() < 0.3:
        del lines[rng.choice(short)]
    if rng.random() < 0.4:
        lines.append(rng.choice(BOILERPLATE_ZH if cjk else BOILERPLATE_EN))
    text = "\n".join(lines)
    if rng.random() < 0.5:  # formatting: lines joined, spaces doubled, or shouting
        text = rng.choice([text.replace("\n", " "), text.replace(" ", "  "), text.upper()])
    return text


def _edit_tokens(tokens: list[str], rate: float, rng: random.Random, vocab: list[str]) -> list[str]:
    out = []
    for token in tokens:
        r = rng.random()
        if r < rate / 3:
            continue  # deleted
        out.append(rng.choice(vocab) if r < 2 * rate / 3 else token)  # substituted or kept
        if 2 * rate / 3 <= r < rate:
            out.append(rng.choice(vocab))  # inserted after
    return out


@lru_cache(maxsize=1)
def planted_corpus(seed: int = 0) -> tuple[list[str], list[int]]:
    """(texts, source): 200 English and 50 Chinese real documents, 1-3 edited copies of 40% of them
    (shuffled into the corpus), and non-duplicates that share a page template, or half their text,
    with another document. Two texts are true duplicates iff they have the same source."""
    rng = random.Random(seed)
    en, zh = _distinct(_enwiki()), _distinct(_zh_paragraphs())
    assert len(en) >= 260 and len(zh) >= 70, (len(en), len(zh))
    bases = [(t, False) for t in en[:200]] + [(t, True) for t in zh[:50]]
    fresh_en, fresh_zh = en[200:260], zh[50:70]  # bodies for the non-duplicates, never copied
    docs = [(text, i) for i, (text, _) in enumerate(bases)]
    for i, (text, cjk) in enumerate(bases):
        if rng.random() < 0.4:
            docs += [(_near_copy(text, rng, cjk), i) for _ in range(rng.randint(1, 3))]
    src = len(bases)
    for body in fresh_en[:30]:  # a shared template around different articles
        docs.append((TEMPLATE_EN + body, src))
        src += 1
    for body in fresh_zh[:10]:
        docs.append((TEMPLATE_ZH + body, src))
        src += 1
    for k, body in enumerate(fresh_en[30:60] + fresh_zh[10:20]):  # half of a base document
        base = bases[k * 5][0] if k < 30 else bases[200 + k - 30][0]
        half = _SENTENCE_END.split(base)
        docs.append(("".join(half[: len(half) // 2]) + "\n" + body, src))
        src += 1
    rng.shuffle(docs)
    return [t for t, _ in docs], [s for _, s in docs]


def pair_scores(clusters: list[list[int]], source: list[int]) -> tuple[float, float]:
    """Pairwise (recall, precision): a pair in one cluster is right iff both have one source."""
    predicted = {(a, b) for c in clusters for a, b in itertools.combinations(c, 2)}
    by_source: dict[int, list[int]] = {}
    for i, s in enumerate(source):
        by_source.setdefault(s, []).append(i)
    true = {p for g in by_source.values() for p in itertools.combinations(g, 2)}
    hits = len(predicted & true)
    return hits / max(len(true), 1), hits / max(len(predicted), 1)


def _grid(texts, source, shingle_sizes, thresholds, num_perm=128, seed=1) -> dict:
    scores = {}
    for size in shingle_sizes:
        sigs = np.stack([minhash_signature(t, num_perm, size, seed) for t in texts])
        for th in thresholds:
            clusters = near_duplicate_clusters(list(range(len(texts))), sigs, th, num_perm, seed)
            scores[size, th] = pair_scores(clusters, source)
    return scores


def test_planted_near_duplicates():
    """The quality bar: pairwise recall >= 0.9 and precision >= 0.95 on planted copies with 3-8% of
    their words edited. The default (5-word shingles, 0.8) finds only copies edited far less (about
    2% of pairs here): each edited word breaks every shingle through it, so 5% edits leave a copy
    at 5-shingle Jaccard ~0.55. Three-word shingles at 0.5 reach the bar."""
    texts, source = planted_corpus()
    n_true = sum(source.count(s) > 1 for s in set(source))
    scores = _grid(texts, source, (3, 5), (0.5, 0.6, 0.7, 0.8))
    print(f"\n{len(texts)} documents, {n_true} with planted copies (3-8% of words edited)")
    print("shingle  threshold  recall  precision")
    for (size, th), (recall, precision) in scores.items():
        print(f"{size:7d}  {th:9.1f}  {recall:6.3f}  {precision:9.3f}")
    recall, precision = scores[3, 0.5]
    assert recall >= 0.9 and precision >= 0.95, (recall, precision)
    # the template and half-overlap documents are never merged, whatever the setting
    assert all(p >= 0.95 for _, p in scores.values()), scores
