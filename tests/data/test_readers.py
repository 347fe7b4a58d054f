"""Readers: every format, plain and gzipped, the txt split rules, and each bad input's message."""

import gzip
import json
import subprocess
import sys

import pytest

from lmforge.config import ConfigError, DataConfig, SourceConfig
from lmforge.data.readers import DataError, is_val, iter_documents, iter_split, pack_pieces

STORY = "Once upon a time.\nThere was a cat.\n\n\nThe cat sat.\n\n  \nThe end, 你好.\n"


def write(path, text: str):
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def docs(tmp_path, path, **kw):
    return list(iter_documents(SourceConfig(path=str(path), **kw), str(tmp_path)))


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz"])
def test_txt_blank_line(tmp_path, name):
    write(tmp_path / name, STORY)
    assert docs(tmp_path, tmp_path / name) == [
        "Once upon a time.\nThere was a cat.",
        "The cat sat.",
        "The end, 你好.",
    ]


def test_txt_line_and_file(tmp_path):
    write(tmp_path / "a.txt", STORY)
    assert docs(tmp_path, tmp_path / "a.txt", split_on="line") == [
        "Once upon a time.",
        "There was a cat.",
        "The cat sat.",
        "The end, 你好.",
    ]
    assert docs(tmp_path, tmp_path / "a.txt", split_on="file") == [STORY.strip()]


def test_txt_min_chars_joins_pieces(tmp_path):
    write(tmp_path / "a.txt", "aaaa\nbbbb\ncccc\ndddd\ne\n")
    # 'aaaa\nbbbb' is 9 chars >= 8; 'cccc\ndddd' too; the short tail is still a document
    assert docs(tmp_path, tmp_path / "a.txt", split_on="line", min_chars=8) == [
        "aaaa\nbbbb",
        "cccc\ndddd",
        "e",
    ]
    assert list(pack_pieces(["p1", " ", "p2"], 3, "\n\n")) == ["p1\n\np2"]


def test_txt_crlf_and_bom(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffone\r\ntwo\r\n\r\nthree\r\n".encode())
    assert docs(tmp_path, tmp_path / "a.txt") == ["one\ntwo", "three"]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz"])
def test_jsonl(tmp_path, name):
    rows = [{"text": "first"}, {"text": "  "}, {"text": "第二", "id": 2}]
    write(tmp_path / name, "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert docs(tmp_path, tmp_path / name) == ["first", "第二"]


def test_jsonl_other_field_and_format_override(tmp_path):
    write(tmp_path / "a.data", json.dumps({"body": "hello"}) + "\n")
    assert docs(tmp_path, tmp_path / "a.data", format="jsonl", text_field="body") == ["hello"]
    assert docs(tmp_path, "*.data", format="jsonl", text_field="body") == ["hello"]


@pytest.mark.parametrize("name", ["a.parquet", "a.parquet.gz"])
def test_parquet(tmp_path, name):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": [f"doc {i} 文" for i in range(2500)], "n": list(range(2500))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=1000)
    if name.endswith(".gz"):
        write_bytes = (tmp_path / "a.parquet").read_bytes()
        (tmp_path / name).write_bytes(gzip.compress(write_bytes))
    out = docs(tmp_path, tmp_path / name)
    assert len(out) == 2500 and out[0] == "doc 0 文" and out[-1] == "doc 2499 文"


def test_directory_and_glob_sorted_and_skip_other_files(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write(d / "b.txt", "bee\n")
    write(d / "a.jsonl.gz", json.dumps({"text": "ay"}) + "\n")
    write(d / "README.md", "not data\n")
    assert docs(tmp_path, d) == ["ay", "bee"]
    assert docs(tmp_path, "corpus/*") == ["ay", "bee"]  # relative to base_dir
    assert docs(tmp_path, str(d / "*.txt")) == ["bee"]


def test_max_docs(tmp_path):
    write(tmp_path / "a.txt", "\n".join(f"line {i}" for i in range(100)))
    assert docs(tmp_path, tmp_path / "a.txt", split_on="line", max_docs=7) == [
        f"line {i}" for i in range(7)
    ]


# --------------------------------------------------------------------------- errors


def test_missing_file_names_the_paths_tried(tmp_path):
    with pytest.raises(ConfigError, match=r"file not found: 'nope/x.txt' \(tried .*nope/x.txt"):
        docs(tmp_path, "nope/x.txt")
    with pytest.raises(ConfigError, match="no .* files .*match 'nope/\\*.txt'"):
        docs(tmp_path, "nope/*.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        docs(tmp_path, tmp_path / "empty")


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl.gz"])
def test_invalid_utf8_names_line_and_offset(tmp_path, name):
    data = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(DataError, match=r"bad\..*invalid UTF-8 at line 2, byte offset 28"):
        docs(tmp_path, tmp_path / name)


def test_malformed_json_names_line(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"a\.jsonl: line 3 is not valid JSON"):
        docs(tmp_path, tmp_path / "a.jsonl")


def test_missing_or_wrong_field(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl: line 2 has no field 'text' \(it has: body\)"):
        docs(tmp_path, tmp_path / "a.jsonl")
    write(tmp_path / "b.jsonl", '{"text": 5}\n')
    with pytest.raises(
        DataError, match=r"b\.jsonl: line 1: field 'text' is int, expected a string"
    ):
        docs(tmp_path, tmp_path / "b.jsonl")
    write(tmp_path / "c.jsonl", "[1, 2]\n")
    with pytest.raises(DataError, match=r"line 1 is a JSON list"):
        docs(tmp_path, tmp_path / "c.jsonl")


def test_parquet_missing_or_wrong_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text' \(columns: body\)"):
        docs(tmp_path, tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [1]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: column 'text' has type int64"):
        docs(tmp_path, tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: row 1: field 'text' is null"):
        docs(tmp_path, tmp_path / "c.parquet")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable parquet file"):
        docs(tmp_path, tmp_path / "d.parquet")


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(("hello world\n" * 1000).encode())
    (tmp_path / "trunc.txt.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"trunc\.txt\.gz: corrupt or truncated gzip"):
        docs(tmp_path, tmp_path / "trunc.txt.gz")
    (tmp_path / "junk.txt.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"junk\.txt\.gz: corrupt or truncated gzip"):
        docs(tmp_path, tmp_path / "junk.txt.gz")


def test_unknown_extension_needs_format(tmp_path):
    write(tmp_path / "a.dat", "x\n")
    with pytest.raises(ConfigError, match="set format"):
        docs(tmp_path, tmp_path / "a.dat")


# --------------------------------------------------------------------------- train / val split


def test_is_val_is_the_same_in_another_process():
    texts = [f"document number {i} 文" for i in range(200)]
    here = [is_val(t, 0.3) for t in texts]
    code = (
        "from lmforge.data.readers import is_val;"
        "print(''.join('1' if is_val(f'document number {i} 文', 0.3) else '0' for i in range(200)))"
    )
    env_seed = {"PYTHONHASHSEED": "123"}  # str hashing differs per process; ours must not
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env_seed, **_env()}
    )
    assert out.stdout.strip() == "".join("1" if v else "0" for v in here)
    assert is_val("hello", 0.5) is False and is_val("hello", 0.999999) is True  # pinned


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}


def test_is_val_fraction():
    n = 20000
    frac = sum(is_val(f"doc {i}", 0.1) for i in range(n)) / n
    assert 0.09 < frac < 0.11


def test_iter_split_partitions_the_corpus(tmp_path):
    write(tmp_path / "a.txt", "\n".join(f"line {i}" for i in range(300)))
    cfg = DataConfig(
        sources=[{"path": str(tmp_path / "a.txt"), "split_on": "line"}], val_fraction=0.2
    )
    train = [d for _, d in iter_split(cfg, str(tmp_path), "train")]
    val = [d for _, d in iter_split(cfg, str(tmp_path), "val")]
    assert sorted(train + val) == sorted(f"line {i}" for i in range(300))
    assert not set(train) & set(val) and 30 < len(val) < 90
    with pytest.raises(ValueError, match="split must be"):
        next(iter_split(cfg, str(tmp_path), "test"))
