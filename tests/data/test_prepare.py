"""prepare: shards hold exactly the documents, framed by BOS/EOS; the manifest is written last."""

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import DataConfig
from lmforge.data import prepare
from lmforge.data.readers import DataError, is_val, iter_documents
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer_train import train_tokenizer

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


# --------------------------------------------------------------------------- mixtures


def _mix_cfg(d: Path, en: dict, zh: dict, **kw) -> DataConfig:
    cfg = make_corpus(d)
    srcs = [{**vars(cfg.sources[0]), **en}, {**vars(cfg.sources[1]), **zh}]
    return DataConfig(sources=srcs, val_fraction=0.2, num_workers=1, **kw)


def _train_docs(out: Path, m: dict) -> list[tuple]:
    dtype = np.dtype(m["dtype"])
    return [tuple(d) for e in m["train_shards"] for d in read_docs(out, e["file"][:-4], dtype)]


def test_mixture_epochs_write_each_source_that_many_times(tmp_path, tok_dir):
    """GPT-3's table: one source seen 3.4 times, another 0.44 times."""
    plain = prepare.run(make_corpus(tmp_path), tok_dir, str(tmp_path), tmp_path / "plain")
    cfg = _mix_cfg(tmp_path, {"epochs": 3.4}, {"epochs": 0.44})
    m = prepare.run(cfg, tok_dir, str(tmp_path), tmp_path / "mix")
    en, zh = m["sources"]
    # whole passes exactly, the fraction within sampling noise
    assert (
        en["mixture"]["docs"]
        == 3 * en["train"]["docs"] + en["mixture"]["docs"] % en["train"]["docs"]
    )
    frac = (en["mixture"]["docs"] - 3 * en["train"]["docs"]) / en["train"]["docs"]
    assert 0.25 < frac < 0.55
    assert 0.25 < zh["mixture"]["docs"] / zh["train"]["docs"] < 0.65
    rows = {r["name"]: r for r in prepare.realised_mixture(m)}
    assert rows["en"]["tokens"] == en["mixture"]["tokens"]
    assert (
        sum(e["tokens"] for e in m["train_shards"])
        == en["mixture"]["tokens"] + zh["mixture"]["tokens"]
    )
    assert abs(rows["en"]["epochs"] - 3.4) < 0.15 and abs(rows["zh"]["epochs"] - 0.44) < 0.2
    # every written document is one of the source's own, and the val files are untouched
    docs = _train_docs(tmp_path / "mix", m)
    unique = set(_train_docs(tmp_path / "plain", plain))
    assert set(docs) <= unique and len(docs) == en["mixture"]["docs"] + zh["mixture"]["docs"]
    assert m["val"] == plain["val"]
    # copies land apart: en's pass 0, zh's only pass, then en's passes 1, 2 and a part of 3
    n_en, n_zh = en["train"]["docs"], zh["mixture"]["docs"]
    plain_docs = _train_docs(tmp_path / "plain", plain)
    assert docs[:n_en] == plain_docs[:n_en]
    assert set(docs[n_en : n_en + n_zh]) <= set(plain_docs[n_en:])
    assert docs[n_en + n_zh : 2 * n_en + n_zh] == plain_docs[:n_en]


def test_mixture_weights_give_each_source_its_share(tmp_path, tok_dir):
    cfg = _mix_cfg(tmp_path, {"weight": 0.25}, {"weight": 0.75}, train_tokens=20_000)
    m = prepare.run(cfg, tok_dir, str(tmp_path), tmp_path / "w")
    rows = {r["name"]: r for r in prepare.realised_mixture(m)}
    total = rows["en"]["tokens"] + rows["zh"]["tokens"]
    assert abs(total - 20_000) / 20_000 < 0.1
    assert abs(rows["zh"]["share"] - 0.75) < 0.05, rows


def test_mixture_is_deterministic_and_unmixed_runs_are_unchanged(tmp_path, tok_dir):
    cfg = _mix_cfg(tmp_path, {"epochs": 1.5}, {"epochs": 0.5})
    a = prepare.run(cfg, tok_dir, str(tmp_path), tmp_path / "a")
    b = prepare.run(cfg, tok_dir, str(tmp_path), tmp_path / "b")
    assert _train_docs(tmp_path / "a", a) == _train_docs(tmp_path / "b", b)
    assert not list((tmp_path / "a").glob(".stage*")), "staging files must be removed"
    # epochs 1 on every source is the plain corpus order, shard for shard
    one = prepare.run(
        _mix_cfg(tmp_path, {"epochs": 1}, {"epochs": 1}), tok_dir, str(tmp_path), tmp_path / "one"
    )
    plain = prepare.run(make_corpus(tmp_path), tok_dir, str(tmp_path), tmp_path / "plain")
    assert _train_docs(tmp_path / "one", one) == _train_docs(tmp_path / "plain", plain)


@pytest.mark.parametrize(
    "en, zh, kw, match",
    [
        ({"weight": 1.0}, {}, {}, "give every source a weight"),
        ({"weight": 1.0, "epochs": 2}, {"weight": 1.0}, {}, "not both"),
        ({}, {}, {"train_tokens": 100}, "needs mixture weights"),
        ({"epochs": -1}, {}, {}, "must be >= 0"),
    ],
)
def test_mixture_config_errors(tmp_path, en, zh, kw, match):
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _mix_cfg(tmp_path, en, zh, **kw)
