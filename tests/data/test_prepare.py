"""prepare: shards hold exactly the documents, framed by BOS/EOS; the manifest is written last."""

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import DataConfig
from lmforge.data import prepare
from lmforge.data.readers import DataError, is_val, iter_documents
from lmforge.tokenizer import Tokenizer, train_tokenizer

EN = [f"Story {i}: the cat sat on the mat and looked at bird number {i * 7}." for i in range(120)]
ZH = [f"第{i}回 孙悟空大闹天宫，玉帝请来如来佛祖。" * (1 + i % 3) for i in range(80)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(EN + ZH, vocab_size=400).save(d)
    return d


def make_corpus(d: Path, **kw) -> DataConfig:
    (d / "en.txt").write_text("\n\n".join(EN) + "\n")
    (d / "zh.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in ZH))
    sources = [{"name": "en", "path": "en.txt"}, {"name": "zh", "path": "zh.jsonl", "lang": "zh"}]
    return DataConfig(sources=sources, **{"val_fraction": 0.2, "num_workers": 1, **kw})


def read_docs(out: Path, name: str, dtype) -> list[np.ndarray]:
    tokens = np.fromfile(out / f"{name}.bin", dtype=dtype)
    starts = np.load(out / f"{name}.idx.npy")
    return np.split(tokens, starts[1:])


def test_end_to_end(tmp_path, tok_dir):
    cfg = make_corpus(tmp_path, shard_tokens=1500)
    m = prepare.run(cfg, tok_dir, str(tmp_path), tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "manifest.json").read_text()) == m
    tok = Tokenizer.load(tok_dir)
    assert (m["dtype"], m["vocab_size"], m["bos_id"], m["eos_id"]) == ("uint16", 400, 1, 2)
    assert m["tokenizer_fingerprint"] == tok.fingerprint()

    # --- train shards: counts match the files, no shard over the limit, documents in order
    assert len(m["train_shards"]) > 1
    train_docs = []
    for shard in m["train_shards"]:
        name = shard["file"].removesuffix(".bin")
        assert (out / shard["file"]).stat().st_size == 2 * shard["tokens"] <= 2 * 1500
        docs = read_docs(out, name, np.uint16)
        assert len(docs) == shard["docs"]
        train_docs += docs
    expected = [d for d in EN + ZH if not is_val(d, 0.2)]
    for ids, text in zip(train_docs, expected, strict=True):
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1].tolist()) == text

    # --- validation, per language
    assert set(m["val"]) == {"en", "zh"}
    for lang, src in (("en", EN), ("zh", ZH)):
        want = [d for d in src if is_val(d, 0.2)]
        docs = read_docs(out, f"val_{lang}", np.uint16)
        assert [tok.decode(d[1:-1].tolist()) for d in docs] == want
        assert m["val"][lang]["docs"] == len(want)
        assert m["val"][lang]["bytes"] == sum(len(d.encode()) for d in want)
        assert m["val"][lang]["tokens"] == sum(len(d) for d in docs)

    # --- per-source stats add up
    by_name = {s["name"]: s for s in m["sources"]}
    assert by_name["en"]["train"]["docs"] + by_name["en"]["val"]["docs"] == len(EN)
    assert sum(s["train"]["tokens"] for s in m["sources"]) == sum(
        s["tokens"] for s in m["train_shards"]
    )
    assert by_name["zh"]["train"]["chars"] == sum(len(d) for d in ZH if not is_val(d, 0.2))
    assert not list(out.glob(".*tmp*"))


def test_workers_give_identical_shards(tmp_path, tok_dir):
    one = prepare.run(make_corpus(tmp_path), tok_dir, str(tmp_path), tmp_path / "one")
    two = prepare.run(
        make_corpus(tmp_path, num_workers=2), tok_dir, str(tmp_path), tmp_path / "two"
    )
    assert one == two
    for f in ["train_000.bin", "val_en.bin", "val_zh.bin"]:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


def test_dtype_choice():
    assert prepare.token_dtype(8192) == np.uint16
    assert prepare.token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert prepare.token_dtype(65537) == np.uint32
    assert prepare.token_dtype(151_936) == np.uint32


def test_failed_write_leaves_no_manifest(tmp_path, tok_dir, monkeypatch):
    cfg = make_corpus(tmp_path)
    out = tmp_path / "out"
    prepare.run(cfg, tok_dir, str(tmp_path), out)  # a complete earlier run
    assert (out / "manifest.json").exists()

    def full_disk(self, ids, n_bytes):
        if self.tokens > 500:
            raise OSError(28, "No space left on device")
        return real_write(self, ids, n_bytes)

    real_write = prepare.TokenFile.write
    monkeypatch.setattr(prepare.TokenFile, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        prepare.run(cfg, tok_dir, str(tmp_path), out)
    assert not (out / "manifest.json").exists()  # the old one is gone too: shards were replaced
    assert not list(out.glob(".*tmp*"))


def test_no_training_documents_is_an_error(tmp_path, tok_dir):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    cfg = DataConfig(sources=[{"name": "blank", "path": "blank.txt"}], num_workers=1)
    with pytest.raises(
        DataError, match=r"no training documents in any source: blank \(blank.txt\)"
    ):
        prepare.run(cfg, tok_dir, str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_reader_errors_pass_through(tmp_path, tok_dir):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    cfg = DataConfig(sources=[{"name": "bad", "path": "bad.jsonl"}], num_workers=1)
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        prepare.run(cfg, tok_dir, str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bundled_dataset_reads(tmp_path, tok_dir):
    # the repo's own datasets/ folder is what the default recipe reads
    root = Path(__file__).resolve().parents[2]
    src = {"name": "ts", "path": "datasets/tinystories/*.txt.gz", "max_docs": 50}
    cfg = DataConfig(sources=[src], num_workers=1)
    m = prepare.run(cfg, tok_dir, str(root), tmp_path / "out")
    assert m["sources"][0]["train"]["docs"] + m["sources"][0]["val"]["docs"] == 50
    assert len(list(iter_documents(cfg.sources[0], str(root)))) == 50
