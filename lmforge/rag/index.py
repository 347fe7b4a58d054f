"""`lmforge rag index`: documents -> chunks in SQLite, a BM25 index and a dense matrix.

Only what changed is redone: a document whose content hash (title and text) is already in the
index keeps its chunks and vectors; a new or changed one is chunked (and embedded) again; one
no longer among the inputs is deleted. BM25 statistics (document frequencies, average length)
depend on every chunk, so the BM25 index is rebuilt from the stored chunks each time (a second
for tens of thousands of chunks); embedding is the expensive part and is never repeated for an
unchanged document. Chunks are ordered by (doc_id, ord) for BM25 and the dense matrix alike, so
an updated index is the same as a fresh one.

The new index is built in a temporary folder (a copy of the old SQLite file, changed in one
transaction) and renamed into place: an error or Ctrl-C midway leaves the old index as it was."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lmforge.config import ConfigError
from lmforge.io import atomic_dir
from lmforge.rag.chunk import chunk_spans, count_words
from lmforge.rag.docs import Doc, read_docs

DB = "chunks.sqlite"
BM25_DIR = "bm25"
DENSE = "dense.npy"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    doc_id TEXT PRIMARY KEY, title TEXT NOT NULL, source TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    doc_id TEXT NOT NULL REFERENCES docs(doc_id), ord INTEGER NOT NULL,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL, text TEXT NOT NULL, hash TEXT NOT NULL,
    vector BLOB, PRIMARY KEY (doc_id, ord));
"""
# BM25 terms: lower-cased words and numbers, and CJK characters with their bigrams (Chinese has
# no spaces: a character alone is too common to rank by, a word is usually two characters)
TERM = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+|[^\W_]+", re.UNICODE)
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


class Embedder(Protocol):
    """What the dense side needs from an encoder (`lmforge.infer.embed.Embedder` is one):
    `embed(texts)` -> (N, D) float32 rows, L2-normalised; `name` tells two encoders apart
    (a vector made by one is meaningless to another). An encoder that also has
    `count_tokens(text) -> int` chunks by its own tokenizer."""

    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class IndexStats:
    docs: int
    chunks: int
    added: int
    updated: int
    deleted: int
    unchanged: int


def bm25s_module():
    """bm25s, or an error naming the extra that installs it."""
    try:
        import bm25s
        import bm25s.stopwords
    except ImportError:
        raise ConfigError("lmforge rag needs bm25s: pip install 'lmforge[rag]'") from None
    return bm25s


def terms(text: str) -> list[str]:
    """The BM25 terms of a text (English stopwords dropped: they match every chunk)."""
    stop = set(bm25s_module().stopwords.STOPWORDS_EN)

    out = []
    for m in TERM.finditer(text.lower()):
        w = m.group()
        if CJK.match(w):
            out += list(w) + [w[i : i + 2] for i in range(len(w) - 1)]
        elif w not in stop:
            out.append(w)
    return out


def settings(max_tokens: int, overlap: int, embedder: Embedder | None) -> str:
    """Everything that decides a document's chunks and vectors besides its text: when these
    change, every document is redone."""
    tokens = "encoder" if hasattr(embedder, "count_tokens") else "words"
    name = getattr(embedder, "name", None)
    return json.dumps(
        {"max_tokens": max_tokens, "overlap": overlap, "tokens": tokens, "encoder": name}
    )


def build_index(
    paths: list[str],
    out: str | Path,
    embedder: Embedder | None = None,
    max_tokens: int = 200,
    overlap: int = 40,
    batch_size: int = 64,
) -> IndexStats:
    """Index the documents in `paths` into folder `out`, reusing what an index there already has."""
    if max_tokens < 1 or not 0 <= overlap < max_tokens:
        raise ConfigError(
            f"--max-tokens must be >= 1 and 0 <= --overlap < --max-tokens, got {max_tokens}, {overlap}"
        )
    docs = read_docs(paths)  # every document checked before anything is written
    out = Path(out)
    if out.exists() and not (out / DB).is_file():
        raise ConfigError(f"{out} exists and is not a rag index (no {DB}); choose another --out")
    want = settings(max_tokens, overlap, embedder)
    with atomic_dir(out) as tmp:
        if (out / DB).is_file():
            shutil.copy2(out / DB, tmp / DB)
        con = sqlite3.connect(tmp / DB)
        try:
            with con:  # one transaction
                con.executescript(SCHEMA)
                stats = _update(con, docs, want, embedder, max_tokens, overlap, batch_size)
            _write_derived(con, tmp)
        finally:
            con.close()
    return stats


def _update(
    con, docs: list[Doc], want: str, embedder, max_tokens, overlap, batch_size
) -> IndexStats:
    """Apply the difference between the stored documents and `docs` to the tables."""
    row = con.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
    if row is not None and row[0] != want:
        con.execute("DELETE FROM chunks")  # chunking or encoder changed: redo everything
        con.execute("DELETE FROM docs")
    con.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (want,))
    old = dict(con.execute("SELECT doc_id, hash FROM docs"))
    new_ids = {d.doc_id for d in docs}
    gone = [i for i in old if i not in new_ids]
    todo = [d for d in docs if old.get(d.doc_id) != d.hash]
    for doc_id in gone + [d.doc_id for d in todo if d.doc_id in old]:
        con.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        con.execute("DELETE FROM docs WHERE doc_id = ?", (doc_id,))
    for d in docs:  # a document moved to another file keeps its chunks; its source follows
        con.execute("UPDATE docs SET source = ? WHERE doc_id = ?", (d.source, d.doc_id))
    count = getattr(embedder, "count_tokens", count_words)
    rows = []
    for d in todo:
        con.execute("INSERT INTO docs VALUES (?, ?, ?, ?)", (d.doc_id, d.title, d.source, d.hash))
        for k, (s, e) in enumerate(chunk_spans(d.text, max_tokens, overlap, count)):
            rows.append((d.doc_id, k, s, e, d.text[s:e]))
    vectors = _embed([r[4] for r in rows], embedder, batch_size)
    con.executemany(
        "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (*r, _sha(r[4]), None if vectors is None else vectors[i].tobytes())
            for i, r in enumerate(rows)
        ],
    )
    n_chunks = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    updated = sum(d.doc_id in old for d in todo)
    return IndexStats(
        len(docs), n_chunks, len(todo) - updated, updated, len(gone), len(docs) - len(todo)
    )


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _embed(texts: list[str], embedder, batch_size: int) -> np.ndarray | None:
    if embedder is None or not texts:
        return None
    parts = [np.asarray(embedder.embed(texts[i : i + batch_size]), dtype=np.float32)
             for i in range(0, len(texts), batch_size)]  # fmt: skip
    vectors = np.concatenate(parts)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise ConfigError(
            f"encoder {embedder.name!r} returned shape {vectors.shape} for {len(texts)} texts"
        )
    return vectors


def _write_derived(con, folder: Path) -> None:
    """The BM25 index and the dense matrix, from every stored chunk in (doc_id, ord) order."""
    bm25s = bm25s_module()
    rows = con.execute("SELECT text, vector FROM chunks ORDER BY doc_id, ord").fetchall()
    bm25 = bm25s.BM25()
    bm25.index([terms(t) for t, _ in rows], show_progress=False)
    bm25.save(str(folder / BM25_DIR))
    if rows and rows[0][1] is not None:
        np.save(folder / DENSE, np.stack([np.frombuffer(v, dtype=np.float32) for _, v in rows]))
