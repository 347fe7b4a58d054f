"""`lmforge rag query`: BM25 and dense rankings fused by reciprocal rank fusion.

RRF (Cormack et al., SIGIR 2009): fused(c) = sum over rankings of 1 / (RRF_K + rank(c)), rank
from 1. It needs no calibration between BM25 scores (unbounded, query-dependent) and cosine
similarities, which is why it is used here; K = 60 is the paper's value: it keeps a single
ranking's top hit from outweighing agreement between the two. The score threshold applies to
the raw scores instead (a chunk enters the BM25 ranking only above `min_bm25`, the dense one only
above `min_dense`), since a fused score says nothing about relevance: below both thresholds a
chunk is not returned, and with nothing returned `ask` abstains."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.config import ConfigError
from lmforge.rag.index import BM25_DIR, DB, DENSE, Embedder, bm25s_module, terms

RRF_K = 60
DEPTH = 100  # each ranking contributes its top DEPTH chunks to the fusion


@dataclass
class Hit:
    rank: int
    doc_id: str
    title: str
    start: int
    end: int
    text: str
    bm25: float | None  # None: not in the BM25 ranking (below the threshold or past DEPTH)
    dense: float | None
    fused: float

    def as_dict(self) -> dict:
        return asdict(self)


def rrf(rankings: list[list[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion of rankings (lists of item ids, best first)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for r, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + r)
    return fused


def top(scores: np.ndarray, minimum: float, depth: int = DEPTH) -> list[int]:
    """Indices of the best `depth` scores above `minimum`, best first (ties: lower index)."""
    keep = np.flatnonzero(scores > minimum)
    order = np.lexsort((keep, -scores[keep]))[:depth]
    return keep[order].tolist()


class Index:
    """An index folder opened for queries: chunk rows, the BM25 index and the dense matrix."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / DB).is_file():
            raise ConfigError(
                f"{path}: not a rag index (no {DB}); build one with `lmforge rag index`"
            )
        con = sqlite3.connect(f"file:{path / DB}?mode=ro", uri=True)
        try:
            self.rows = con.execute(
                'SELECT doc_id, title, start, "end", chunks.text FROM chunks JOIN docs USING (doc_id) '
                "ORDER BY doc_id, ord"
            ).fetchall()
            self.settings = json.loads(
                con.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()[0]
            )
        finally:
            con.close()
        self.bm25 = bm25s_module().BM25.load(str(path / BM25_DIR))
        self.dense = np.load(path / DENSE) if (path / DENSE).is_file() else None

    def check_encoder(self, embedder: Embedder | None) -> None:
        built = self.settings.get("encoder")
        if embedder is not None and built is None:
            raise ConfigError(
                "this index has no vectors (built without --encoder): drop --encoder, or re-index with it"
            )
        if embedder is not None and embedder.name != built:
            raise ConfigError(
                f"this index was embedded with {built!r}, not {embedder.name!r}: pass that --encoder"
            )

    def search(
        self,
        query: str,
        k: int = 5,
        embedder: Embedder | None = None,
        min_bm25: float = 0.0,
        min_dense: float = 0.3,
    ) -> list[Hit]:
        """The top k chunks for `query` (BM25 alone without an embedder)."""
        if not query.strip():
            raise ConfigError("the query is empty")
        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        self.check_encoder(embedder)
        bm25 = self.bm25.get_scores(terms(query)) if terms(query) else np.zeros(len(self.rows))
        rankings = [top(bm25, min_bm25)]
        dense = None
        if embedder is not None and self.dense is not None:
            q = np.asarray(embedder.embed([query]), dtype=np.float32)[0]
            dense = self.dense @ q  # exact search: cosine, the rows being L2-normalised
            rankings.append(top(dense, min_dense))
        fused = rrf(rankings)
        order = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        in_bm25, in_dense = set(rankings[0]), set(rankings[1]) if dense is not None else set()
        hits = []
        for r, i in enumerate(order, 1):
            doc_id, title, start, end, text = self.rows[i]
            hits.append(Hit(
                r, doc_id, title, start, end, text,
                round(float(bm25[i]), 4) if i in in_bm25 else None,
                round(float(dense[i]), 4) if i in in_dense else None,
                round(fused[i], 6),
            ))  # fmt: skip
        return hits
