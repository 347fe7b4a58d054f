"""Fixtures for the retrieval tests: a tiny document folder and an embedder made up for them."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

pytest.importorskip("bm25s", reason="the rag tests need bm25s (pip install 'lmforge[rag]')")


class TrigramEmbedder:
    """Made up for the tests, not an encoder: hashed character trigrams, L2-normalised.
    Deterministic, and texts sharing words get close vectors, which is all the index
    mechanics need."""

    name = "test-trigrams-64"
    dim = 64

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            t = f"  {t.lower()}  "
            for j in range(len(t) - 2):
                h = int.from_bytes(hashlib.md5(t[j : j + 3].encode()).digest()[:4], "little")
                out[i, h % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


@pytest.fixture
def embedder():
    return TrigramEmbedder()


# documents made up for the tests (facts are invented)
DOCS = {
    "alpine.md": "# Alpine lakes\n\nLake Ostra lies at 2,100 metres. Its water is cold all year.\n\n"
    "Fishing in Lake Ostra is allowed from June to September.",
    "bakery.txt": "The bakery on Mill Street opens at six. It sells rye bread and pretzels. "
    "The owner, Ada Brun, bought it in 1998.",
    "zh.txt": "长江是中国最长的河流。它流经十一个省份。黄河是第二长的河流！",
}
ROWS = [
    {
        "id": "ship-1",
        "title": "Ships",
        "text": "The ferry Marigold carries 300 passengers between Sala and Orr.",
    },
    {"id": "ship-2", "title": "Ships", "text": "The cargo ship Tern was built in Gdynia in 1977."},
]


@pytest.fixture
def doc_dir(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "ships.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    return d
