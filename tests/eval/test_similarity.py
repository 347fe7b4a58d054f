"""BLEU and ROUGE equal the reference libraries' own results; bad data is a clear error."""

import gzip
import json

import pytest

from lmforge.config import ConfigError
from lmforge.data.readers import DataError
from lmforge.eval.similarity import bleu, evaluate_similarity, read_pairs, rouge

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

HYPS = ["the cat sat on the mat", "a quick brown fox jumps", "hello there world"]
REFS = ["the cat is on the mat", "the quick brown fox jumped", "hello world"]


def test_bleu_is_sacrebleu():
    want = sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert bleu(HYPS, REFS)["bleu"] == pytest.approx(want, abs=1e-9) and want > 0
    zh = bleu(["我喜欢读书"], ["我喜欢看书"])
    assert zh["tokenize"] == "zh"
    assert zh["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(["我喜欢读书"], [["我喜欢看书"]], tokenize="zh").score
    )


def test_rouge_is_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, h) for h, r in zip(HYPS, REFS)]
    got = rouge(HYPS, REFS)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = sum(d[key].fmeasure for d in direct) / len(direct)
        assert got[key] == pytest.approx(want, abs=1e-12)
    assert got["n"] == 3 and got["rouge1_stderr"] > 0
    same = rouge(["今天天气很好"], ["今天天气很好"])  # per-character for Chinese
    assert same["rouge1"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0)


def test_pairs_file_errors_and_end_to_end(tmp_path, micro_pretrained):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "reference": "b"}\n{"source": 1}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"bad\.jsonl:2: a row needs string fields 'source' and 'reference'$"
    ):
        read_pairs(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_pairs(tmp_path / "missing.jsonl")
    packed = tmp_path / "pairs.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write('{"source": "一", "reference": "one"}\n')
    assert read_pairs(packed) == [{"source": "一", "reference": "one"}]
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"source": "a", "reference": "b"}\n{"source": "\xff"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_pairs(broken)
    good = tmp_path / "pairs.jsonl"
    rows = [{"source": "Translate: cat", "reference": "猫"}, {"source": "Hi", "reference": "Hello"}]
    good.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    model_dir = micro_pretrained[1]
    res = evaluate_similarity(
        load_model(model_dir), Tokenizer.load(model_dir), good, max_new_tokens=4
    )
    assert res["n"] == 2 and 0 <= res["bleu"] <= 100 and 0 <= res["rougeL"] <= 1
    assert len(res["examples"]) == 2
