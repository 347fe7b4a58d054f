"""Queries: reciprocal rank fusion against a hand computation, thresholds, Chinese terms."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.config import ConfigError
from lmforge.rag.index import build_index, terms
from lmforge.rag.search import RRF_K, Index, rrf, top


def test_rrf_by_hand():
    fused = rrf([[7, 3, 5], [3, 9]])
    assert RRF_K == 60
    assert fused[3] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[7] == pytest.approx(1 / 61)
    assert fused[9] == pytest.approx(1 / 62)
    assert fused[5] == pytest.approx(1 / 63)
    assert sorted(fused, key=lambda i: -fused[i]) == [3, 7, 9, 5]


def test_top_applies_threshold_and_breaks_ties_by_position():
    scores = np.array([0.5, 0.0, 2.0, 0.5, -1.0])
    assert top(scores, 0.0) == [2, 0, 3]
    assert top(scores, 0.0, depth=2) == [2, 0]


def test_chinese_terms_are_characters_and_bigrams():
    assert terms("长江很长, the River") == ["长", "江", "很", "长", "长江", "江很", "很长", "river"]


def test_fused_scores_match_the_two_rankings(doc_dir, tmp_path, embedder):
    build_index([str(doc_dir)], tmp_path / "idx", embedder, max_tokens=12, overlap=0)
    index = Index(tmp_path / "idx")
    hits = index.search("When does the bakery open?", 3, embedder, min_dense=-1.0)
    assert hits[0].doc_id.endswith("bakery.txt") and hits[0].rank == 1
    bm25 = index.bm25.get_scores(terms("When does the bakery open?"))
    dense = index.dense @ embedder.embed(["When does the bakery open?"])[0]
    rank_b = {i: r for r, i in enumerate(top(bm25, 0.0), 1)}
    rank_d = {i: r for r, i in enumerate(top(dense, -1.0), 1)}
    for h in hits:
        i = next(j for j, row in enumerate(index.rows) if row[0] == h.doc_id and row[2] == h.start)
        want = sum(1 / (60 + r[i]) for r in (rank_b, rank_d) if i in r)
        assert h.fused == pytest.approx(want, abs=1e-6)
        assert h.dense == pytest.approx(float(dense[i]), abs=1e-4)
    assert index.search("长江", 1)[0].doc_id.endswith("zh.txt")


def test_nothing_passes_threshold(doc_dir, tmp_path):
    build_index([str(doc_dir)], tmp_path / "idx")
    assert Index(tmp_path / "idx").search("quantum chromodynamics", 5) == []
    with pytest.raises(ConfigError, match="query is empty"):
        Index(tmp_path / "idx").search("  ", 5)
    with pytest.raises(ConfigError, match="not a rag index"):
        Index(tmp_path / "nothing")
