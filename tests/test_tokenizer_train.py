"""The `lmforge tokenizer` stage (tokenizer_train.py): the sample's budget per source, training
on the data sources, stats.json, copying a given tokenizer."""

import json
from pathlib import Path

import pytest

from lmforge.config import ConfigError, DataConfig, TokenizerConfig
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer_train import run, sample_budgets


def test_sample_budgets():
    # the corpus fits: everything
    assert sample_budgets([10, 20], ["en", "zh"], 100) == [10, 20]
    # within a language, proportional to size; languages by sqrt(size): 400 vs 100 -> 2:1
    b = sample_budgets([300, 100, 100], ["en", "en", "zh"], 90)
    assert b == [45, 15, 30]
    # a small source is taken whole and its unused share goes to the others
    b = sample_budgets([1000, 5], ["en", "zh"], 100)
    assert b == [95, 5]
    assert sum(sample_budgets([7, 0, 3000, 50], ["a", "b", "a", "c"], 500)) <= 500


def write_corpus(d: Path) -> DataConfig:
    (d / "en.txt").write_text(
        "\n\n".join(f"The story number {i} is about a cat." for i in range(400))
    )
    zh = [{"text": f"第{i}章 孙悟空大闹天宫，玉帝请如来佛祖。"} for i in range(300)]
    (d / "zh.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in zh))
    return DataConfig(
        sources=[
            {"name": "en", "path": "en.txt"},
            {"name": "zh", "path": "zh.jsonl", "lang": "zh"},
        ],
        val_fraction=0.1,
    )


def test_run_trains_and_writes_stats(tmp_path):
    data = write_corpus(tmp_path)
    stats = run(
        TokenizerConfig(vocab_size=400, sample_chars=10_000), data, str(tmp_path), tmp_path / "out"
    )
    assert stats["vocab_size"] == 400
    assert set(stats["bytes_per_token"]) == {"en", "zh"}
    assert all(v > 1.0 for v in stats["bytes_per_token"].values())
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    assert Tokenizer.load(tmp_path / "out").fingerprint() == stats["fingerprint"]

    # no text at all is an error, not a tokenizer of bare bytes
    (tmp_path / "empty.txt").write_text("\n")
    empty = DataConfig(sources=[{"name": "empty", "path": "empty.txt"}])
    with pytest.raises(ConfigError, match=r"no training text .* empty \(empty.txt\)"):
        run(TokenizerConfig(vocab_size=400), empty, str(tmp_path), tmp_path / "none")

    # an existing tokenizer is copied as it is
    again = run(TokenizerConfig(path=str(tmp_path / "out")), data, str(tmp_path), tmp_path / "copy")
    assert again == stats
