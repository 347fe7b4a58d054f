"""Exact and near-duplicate detection for `lmforge clean`: keys and signatures per document in the
workers, then clusters over the whole corpus in the driver.

The one idea: a document is reduced to a small fixed-size fingerprint where it is read (a 16-byte
hash of its letters and digits for exact copies, a MinHash signature of its shingles for near
copies), so the corpus-wide stage only ever holds fingerprints. Two documents are near duplicates
when the estimated Jaccard similarity of their shingle sets reaches a threshold; MinHash LSH
proposes candidate pairs, each is checked against the signatures, and the pairs that pass are
joined into clusters whose first member (in corpus order) is kept.

Shingles are word n-grams, except for CJK text (as the quality step decides it), which has no
spaces between words and uses character n-grams instead. Everything here is deterministic across processes and machines:
hashes are zlib.crc32 and blake2b of UTF-8 bytes, never Python's salted `hash()`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

import numpy as np

from lmforge.data.quality import is_cjk_text

# datasketch >= 2.0's default scheme: uint32 hash values, so a signature is 4 bytes per permutation
SCHEME = "affine32"
_NOT_WORD_CHAR = re.compile(r"[\W_]+")  # all but letters and digits: spaces, punctuation, symbols
_PUNCT = re.compile(r"[^\w\s]+")  # punctuation and symbols; keeps the spaces between words
# Python's \w is letters and digits only: combining marks that NFKC cannot fold into a letter (some
# Indic vowel signs) go too. For English and Chinese that never merges two different texts; for
# other scripts it can only merge texts that differ in such marks alone.


def _fold(text: str) -> str:
    """NFKC (full-width letters and digits become ASCII, ligatures split) and case folding."""
    return unicodedata.normalize("NFKC", text).casefold()


# --------------------------------------------------------------------------- exact duplicates


def exact_key(text: str) -> bytes:
    """16-byte blake2b of the text's letters and digits after NFKC and case folding.

    Whitespace, punctuation and symbols (Unicode categories Z*, P*, S*, C*) are all removed, so
    copies that differ only in case, spacing, line breaks, quotes, bullets or markup characters
    collide. Removing symbols too is safe for documents of any length worth keeping: two different
    50-word texts with the same letters and digits in the same order do not occur in practice.
    A text with no letters or digits at all gets the key of the empty string."""
    return hashlib.blake2b(
        _NOT_WORD_CHAR.sub("", _fold(text)).encode("utf-8"), digest_size=16
    ).digest()


def exact_duplicates(keys: Iterable[bytes] | np.ndarray) -> np.ndarray:
    """Bool mask over `keys` (corpus order): True where the same key occurred earlier.

    `keys` is a sequence of 16-byte keys or a (n, 16) uint8 array. Sorting the keys as 16-byte
    values (np.unique) needs 16 bytes per document, against ~100 for a Python set of bytes."""
    if not isinstance(keys, np.ndarray):
        keys = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16)
    assert keys.ndim == 2 and keys.shape[1] == 16, f"keys must be (n, 16) bytes, got {keys.shape}"
    flat = np.ascontiguousarray(keys, dtype=np.uint8).view("V16").ravel()  # (n,) one value each
    _, first = np.unique(flat, return_index=True)  # index of each key's first occurrence
    duplicate = np.ones(len(flat), dtype=bool)
    duplicate[first] = False
    return duplicate


# --------------------------------------------------------------------------- shingles and MinHash


def shingles(text: str, size: int) -> set[str]:
    """The set of `size`-grams of `text`: words for space-separated text, characters for CJK.

    Words are case-folded with punctuation and symbols deleted ("U.S." -> "us", "don't" -> "dont")
    and joined by single spaces; CJK text keeps only its letters and digits and is cut into
    character n-grams. A text shorter than one shingle is one shingle of all of it ("" if empty),
    so every text has a signature and short copies still match each other."""
    assert size >= 1, f"shingle size must be positive, got {size}"
    text = _fold(text)
    if is_cjk_text(text):  # the quality step's test, so both steps agree on what is CJK
        chars = _NOT_WORD_CHAR.sub("", text)
        if len(chars) <= size:
            return {chars}
        return {chars[i : i + size] for i in range(len(chars) - size + 1)}
    words = _PUNCT.sub("", text).split()
    if len(words) <= size:
        return {" ".join(words)}
    # zip of shifted lists, not a slice per shingle: a third faster on English text
    return set(map(" ".join, zip(*(words[i:] for i in range(size)))))


def _hash32(shingle: str) -> int:
    # CRC-32, not datasketch's default SHA-1: signatures get ~1.5x faster end to end, and quality
    # holds: MinHash needs distinct shingles to get distinct values, and datasketch mixes every
    # value with the MurmurHash3 finalizer before permuting it, so CRC's linearity never reaches
    # the minimum. Jaccard estimates stay within MinHash's own error (tests/data/test_dedup.py).
    return zlib.crc32(shingle.encode("utf-8"))


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> np.ndarray:
    # drawn once per process: new ones for every document cost ~30% of the signature time
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations


def minhash_signature(text: str, num_perm: int, shingle_size: int, seed: int) -> np.ndarray:
    """MinHash signature of `shingles(text, shingle_size)`: (num_perm,) uint32, datasketch's
    affine32 scheme with a CRC-32 shingle hash. Same text, size and seed give the same values in
    any process."""
    from datasketch import MinHash

    perms = _permutations(num_perm, seed)
    m = MinHash(num_perm, seed, hashfunc=_hash32, permutations=perms, scheme=SCHEME)
    m.update_batch(shingles(text, shingle_size))
    return m.hashvalues


# --------------------------------------------------------------------------- near-duplicate clusters


def lsh_params(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows) for MinHashLSH such that a pair with Jaccard == threshold becomes a candidate
    with probability >= recall: 1 - (1 - t^rows)^bands.

    datasketch's own choice balances false positives against false negatives, which leaves a pair
    right at the threshold only a ~40% chance of ever being compared (9 bands of 13 rows at 0.8).
    Here every candidate is verified against the signatures, so a false candidate costs a vector
    compare and a missed one costs a duplicate: take the most rows (fewest bands, least memory)
    that still reach `recall`. At 0.8 and 128 permutations that is 18 bands of 7 rows."""
    assert 0.0 < threshold <= 1.0 and num_perm >= 2, (threshold, num_perm)
    ok = [
        r
        for r in range(1, num_perm // 2 + 1)
        if 1 - (1 - threshold**r) ** (num_perm // r) >= recall
    ]
    rows = max(ok, default=1)  # up to num_perm // 2 rows: datasketch needs two bands
    return num_perm // rows, rows


def near_duplicate_clusters(
    ids: Sequence, signatures: np.ndarray, threshold: float, num_perm: int, seed: int
) -> list[list[int]]:
    """Clusters of near-duplicate documents, as sorted positions into `ids`/`signatures`.

    Every document is put into a MinHashLSH index and queried against it; each candidate pair is
    kept only if its estimated Jaccard similarity (the share of equal signature values, as
    `MinHash.jaccard`) is >= threshold, which removes the LSH false positives, and kept pairs are
    merged with union-find. Only clusters of two or more are returned, sorted by first member, so
    "keep c[0], drop c[1:]" keeps the first copy in corpus order. Clusters are connected
    components: a chain of pairs above the threshold joins its ends even if they are further apart.

    `ids` name the documents (they must be unique; used in error messages only). `signatures` is
    (n, num_perm) from `minhash_signature` (uint32, or the same values widened to uint64).

    Memory: the driver holds every signature, num_perm * 4 bytes per document (512 B at 128), and
    datasketch's in-memory index costs ~320 B per document per band (a bytes key, a set and dict
    entries): 18 bands, ~5.8 kB per document, at threshold 0.8; 42 bands, ~12.7 kB, at 0.5 (num_perm
    128, measured with tracemalloc). So 1M documents need ~6-13 GB. Time is linear in documents
    except inside a cluster, where m copies give m^2 candidate pairs.
    """
    from datasketch import LeanMinHash, MinHashLSH

    n = len(ids)
    assert signatures.shape == (n, num_perm), (
        f"signatures are {signatures.shape}, expected ({n}, {num_perm}) for {n} ids"
    )
    if len(set(ids)) != n:
        dup = next(k for k, c in Counter(ids).items() if c > 1)
        raise ValueError(f"near_duplicate_clusters: id {dup!r} occurs more than once")
    assert n == 0 or int(signatures.max()) < 2**32, "signatures are not 32-bit MinHash values"
    sigs = signatures.astype(np.uint32, copy=False)

    def sketch(i: int) -> LeanMinHash:  # made when needed: a list of n of them doubles the memory
        return LeanMinHash(seed=seed, hashvalues=sigs[i], scheme=SCHEME)

    lsh = MinHashLSH(num_perm=num_perm, params=lsh_params(threshold, num_perm))
    with lsh.insertion_session() as session:
        for i in range(n):
            session.insert(i, sketch(i), check_duplication=False)

    parent = list(range(n))  # union-find over positions; roots are the smallest member

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    for i in range(n):
        candidates = [j for j in lsh.query(sketch(i)) if j > i and find(j) != find(i)]
        if not candidates:
            continue
        similarity = (sigs[candidates] == sigs[i]).mean(axis=1)  # (len(candidates),)
        for j in np.asarray(candidates)[similarity >= threshold]:
            a, b = find(i), find(int(j))
            parent[max(a, b)] = min(a, b)

    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)  # ascending i: members come out sorted
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def cluster_report(
    clusters: list[list[int]],
    texts: Sequence[str] | Callable[[int], str],
    max_clusters: int = 10,
    snippet_chars: int = 80,
    max_members: int = 3,
) -> dict:
    """JSON-able summary of near-duplicate clusters for the clean report: how many clusters and
    removed documents, a histogram of cluster sizes, and the largest clusters with the first
    `snippet_chars` characters of their first `max_members` members (the first one is kept).
    `texts` is the corpus or a function from position to text, so the driver can read lazily."""
    text_of = texts if callable(texts) else texts.__getitem__

    def snippet(i: int) -> str:
        s = " ".join(text_of(i).split())
        return s if len(s) <= snippet_chars else s[: snippet_chars - 1] + "…"

    sizes = Counter(len(c) for c in clusters)
    largest = sorted(clusters, key=lambda c: (-len(c), c[0]))[:max_clusters]
    return {
        "clusters": len(clusters),
        "duplicates": sum(len(c) - 1 for c in clusters),
        "size_histogram": {str(k): sizes[k] for k in sorted(sizes)},
        "examples": [
            {
                "size": len(c),
                "members": [int(i) for i in c[:max_members]],
                "snippets": [snippet(int(i)) for i in c[:max_members]],
            }
            for c in largest
        ],
    }
