"""`lmforge rag` end to end, as a user runs it: index a folder, query it with --json, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def lmforge(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", "rag", *map(str, args)],
        capture_output=True, text=True, timeout=120, env=env, cwd=cwd,
    )  # fmt: skip


def test_index_query_json_and_reindex(doc_dir, tmp_path):
    idx = tmp_path / "idx"
    r = lmforge("index", doc_dir, "--out", idx, "--max-tokens", "12", "--overlap", "4")
    assert r.returncode == 0, r.stderr
    assert "5 documents" in r.stdout and "5 added" in r.stdout
    r = lmforge("query", idx, "Which ship was built in Gdynia?", "--k", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["query"] == "Which ship was built in Gdynia?"
    first = out["chunks"][0]
    assert (first["doc_id"], first["title"], first["rank"]) == ("ship-2", "Ships", 1)
    assert first["text"] == "The cargo ship Tern was built in Gdynia in 1977."
    assert (first["start"], first["end"]) == (0, len(first["text"]))
    assert first["bm25"] > 0 and first["dense"] is None and first["fused"] == round(1 / 61, 6)
    r = lmforge("index", doc_dir, "--out", idx, "--max-tokens", "12", "--overlap", "4")
    assert "5 unchanged" in r.stdout


def test_errors_are_one_line(doc_dir, tmp_path):
    (doc_dir / "empty.md").write_text("", encoding="utf-8")
    r = lmforge("index", doc_dir, "--out", tmp_path / "idx")
    assert r.returncode == 2
    assert r.stderr.strip() == f"lmforge rag: error: {doc_dir / 'empty.md'}: the document is empty"
    r = lmforge("query", tmp_path / "idx", "anything")
    assert r.returncode == 2 and "not a rag index" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_encoder_flag_builds_and_queries_dense(doc_dir, tmp_path, capsys, minilm_dir):
    """--encoder DIR: the real all-MiniLM-L6-v2 through lmforge.infer.embed.Embedder."""
    from lmforge.cli import main

    idx, enc = tmp_path / "idx", minilm_dir
    assert main(["rag", "index", str(doc_dir), "--out", str(idx), "--encoder", str(enc)]) == 0
    capsys.readouterr()
    assert (
        main(["rag", "query", str(idx), "ferry passengers", "--json", "--encoder", str(enc)]) == 0
    )
    first = json.loads(capsys.readouterr().out)["chunks"][0]
    assert first["doc_id"] == "ship-1" and first["dense"] > 0.3
    assert first["fused"] == round(2 / 61, 6)  # first in both rankings
    assert main(["rag", "query", str(idx), "ferry"]) == 0  # BM25 alone still works
