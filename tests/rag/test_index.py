"""The index: incremental re-index equals a fresh one; bad documents are named and lose nothing."""

from __future__ import annotations

import gzip
import sqlite3

import numpy as np
import pytest

from lmforge.config import ConfigError
from lmforge.rag.index import DB, DENSE, build_index
from lmforge.rag.search import Index


def snapshot(folder):
    """Everything an index holds: its rows, in a fixed order, and its dense matrix."""
    con = sqlite3.connect(folder / DB)
    try:
        docs = con.execute("SELECT * FROM docs ORDER BY doc_id").fetchall()
        chunks = con.execute("SELECT * FROM chunks ORDER BY doc_id, ord").fetchall()
    finally:
        con.close()
    dense = np.load(folder / DENSE) if (folder / DENSE).exists() else None
    return docs, chunks, dense


def test_reindex_changed_folder_equals_fresh(doc_dir, tmp_path, embedder):
    idx = tmp_path / "idx"
    first = build_index([str(doc_dir)], idx, embedder, max_tokens=12, overlap=4)
    assert (first.docs, first.added) == (5, 5)
    # change one file, delete one, add one, move one
    (doc_dir / "bakery.txt").write_text(
        "The bakery on Mill Street now opens at seven.", encoding="utf-8"
    )
    (doc_dir / "zh.txt").unlink()
    (doc_dir / "new.md").write_text("# New\n\nThe museum shows old clocks.", encoding="utf-8")
    (doc_dir / "sub").mkdir()  # moved, unchanged: kept, with its new source
    (doc_dir / "ships.jsonl").rename(doc_dir / "sub" / "ships.jsonl")
    calls = []
    embed = embedder.embed
    embedder.embed = lambda texts: calls.append(list(texts)) or embed(texts)
    again = build_index([str(doc_dir)], idx, embedder, max_tokens=12, overlap=4)
    assert (again.added, again.updated, again.deleted, again.unchanged) == (1, 1, 1, 3)
    embedded = [t for batch in calls for t in batch]
    # only the new and the changed document are embedded; the unchanged ones keep their vectors
    assert sorted(embedded) == [
        "# New\n\nThe museum shows old clocks.",
        "The bakery on Mill Street now opens at seven.",
    ]

    fresh = tmp_path / "fresh"
    build_index([str(doc_dir)], fresh, embedder, max_tokens=12, overlap=4)
    a, b = snapshot(idx), snapshot(fresh)
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])
    for q in ("bakery opening hours", "museum clocks", "Lake Ostra fishing"):
        assert Index(idx).search(q, 5, embedder) == Index(fresh).search(q, 5, embedder)


def test_rows_keep_ids_titles_offsets(doc_dir, tmp_path):
    build_index([str(doc_dir)], tmp_path / "idx", max_tokens=12, overlap=0)
    docs, chunks, dense = snapshot(tmp_path / "idx")
    assert dense is None  # BM25 only without an encoder
    titles = {d[0]: d[1] for d in docs}
    assert titles["ship-1"] == "Ships" and titles[str(doc_dir / "alpine.md")] == "Alpine lakes"
    assert titles[str(doc_dir / "bakery.txt")] == "bakery"
    texts = {d[0]: (doc_dir / d[0].split("/")[-1]) for d in docs if d[0].startswith("/")}
    for doc_id, _, start, end, text, *_ in chunks:
        if doc_id in texts:
            assert texts[doc_id].read_text(encoding="utf-8")[start:end] == text


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "  \n", "empty.txt: the document is empty"),
        (
            "bad.jsonl",
            '{"id": "x", "text": "ok"}\n{"id": "y"}\n',
            "bad.jsonl:2: the document's `text` is missing",
        ),
        ("broken.jsonl", "{not json\n", "broken.jsonl:1: not valid JSON"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "latin1.txt: cannot read this document"),
        ("cut.jsonl.gz", gzip.compress(b'{"text": "hello"}\n')[:-6], "cut.jsonl.gz: cannot read"),
    ],
)
def test_bad_document_named_and_index_kept(doc_dir, tmp_path, name, content, message):
    idx = tmp_path / "idx"
    build_index([str(doc_dir)], idx)
    before = snapshot(idx)
    bad = doc_dir / name
    bad.write_bytes(content) if isinstance(content, bytes) else bad.write_text(
        content, encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_index([str(doc_dir)], idx)
    assert snapshot(idx)[:2] == before[:2]  # nothing already indexed is lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "idx"]  # no temporaries left


def test_duplicate_id_and_encoder_mismatch(doc_dir, tmp_path, embedder):
    (doc_dir / "dup.jsonl").write_text('{"id": "ship-1", "text": "again"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="'ship-1' appears twice"):
        build_index([str(doc_dir)], tmp_path / "idx")
    (doc_dir / "dup.jsonl").unlink()
    build_index([str(doc_dir)], tmp_path / "idx")
    with pytest.raises(ConfigError, match="no vectors"):
        Index(tmp_path / "idx").search("bread", 3, embedder)
