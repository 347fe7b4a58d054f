"""`lmforge embed MODEL FILE.jsonl --out OUT`: the .npy and ids files, and bad input named."""

import json
import subprocess
import sys

import numpy as np
import pytest


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "lmforge", "embed", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.slow  # two `lmforge embed` processes, each importing torch
def test_embed_writes_vectors_and_ids(minilm_dir, tmp_path):
    from lmforge.infer.embed import Embedder

    rows = [{"id": "a", "text": "A cat on a mat."}, {"body": "猫坐在垫子上。", "text": "猫"},
            {"id": 7, "text": "Vectors for retrieval."}]  # fmt: skip  # made up
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    r = _run(minilm_dir, src, "--out", tmp_path / "out" / "vec", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    vectors = np.load(tmp_path / "out" / "vec.npy")
    ids = [json.loads(x) for x in (tmp_path / "out" / "vec.ids.jsonl").read_text().splitlines()]
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert ids == ["a", 2, 7]  # the row without an id gets its line number
    want = Embedder(minilm_dir).embed([row["text"] for row in rows])
    np.testing.assert_allclose(vectors, want, rtol=0, atol=1e-6)

    r = _run(minilm_dir, src, "--out", tmp_path / "b", "--field", "body")
    assert r.returncode == 2 and "rows.jsonl:1: no non-empty string field 'body'" in r.stderr


@pytest.mark.slow  # two processes
def test_embed_names_the_bad_line_and_the_missing_model(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": broken\n', "utf-8")  # made up
    r = _run(tmp_path, src, "--out", tmp_path / "o")
    assert r.returncode == 2 and "bad.jsonl:2: not valid JSON" in r.stderr
    src.write_text('{"text": "fine"}\n', "utf-8")
    r = _run(tmp_path / "nowhere", src, "--out", tmp_path / "o")
    assert r.returncode == 2 and "config.json is missing" in r.stderr
    assert not (tmp_path / "o.npy").exists()
