"""Sentence BLEU and ROUGE (eval/overlap.py): hand-computed worked examples, then equality with
sacrebleu and rouge-score called the way lm-eval's TruthfulQA generation task calls them."""

import random
from pathlib import Path

import pytest

from lmforge.eval.overlap import bleu_tokens, rouge_l, rouge_n, sentence_bleu

REPO = Path(__file__).resolve().parents[2]

# made-up sentence pairs for the worked examples
CAT_H, CAT_R = "The cat sat on the mat.", "The cat is on the mat."
PARIS_H, PARIS_R = "Paris is the capital of France.", "The capital of France is Paris."


def test_intl_tokens_split_punctuation_and_symbols_but_not_numbers():
    got = bleu_tokens("It costs $1,000.50, i.e. 3.5% (in 2020).")
    assert got == ["It", "costs", "$", "1,000.50", ",", "i", ".", "e", ".", "3.5", "%", "(",
                   "in", "2020", ")", "."]  # fmt: skip


def test_bleu_worked_examples():
    # 7 tokens each (the final "." is a token): matches 6/7, 4/6, 2/5, 1/4; lengths equal, BP 1
    assert sentence_bleu(CAT_H, CAT_R) == pytest.approx(
        100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    )
    # case counts ("the" != "The"): 6/7, 2/6, 1/5 and no 4-gram: NIST smoothing gives 1/(2*4)
    assert sentence_bleu(PARIS_H, PARIS_R) == pytest.approx(100 * (1 / 140) ** 0.25)
    assert sentence_bleu(CAT_R, CAT_R) == pytest.approx(100.0)
    # fewer than 4 tokens: no 4-grams at all, BLEU 0 (lm-eval turns effective order off)
    assert sentence_bleu("No.", "No.") == 0.0
    assert sentence_bleu("", CAT_R) == 0.0
    # shorter than the reference: brevity penalty exp(1 - 8/7)
    short, longer = "The cat is on the mat.", "The black cat is on the mat."
    p = (7 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25  # only the n-grams starting "The cat" miss
    assert sentence_bleu(short, longer) == pytest.approx(100 * p * 2.718281828459045 ** (1 - 8 / 7))


def test_rouge_worked_examples():
    # lower-cased words: the cat sat on the mat / the cat is on the mat
    assert rouge_l(CAT_H, CAT_R) == pytest.approx(100 * 5 / 6)  # LCS "the cat on the mat"
    assert rouge_n(CAT_H, CAT_R, 1) == pytest.approx(100 * 5 / 6)
    assert rouge_n(CAT_H, CAT_R, 2) == pytest.approx(100 * 3 / 5)  # the cat, on the, the mat
    # word order: LCS of "paris is the capital of france" / "the capital of france is paris" is 4
    assert rouge_l(PARIS_H, PARIS_R) == pytest.approx(100 * 4 / 6)
    assert rouge_n(PARIS_H, PARIS_R, 1) == pytest.approx(100.0)
    assert rouge_l("", CAT_R) == 0.0 and rouge_n("!!", CAT_R, 1) == 0.0


def test_equal_to_sacrebleu_and_rouge_score_on_truthfulqa_answers():
    """300 random pairs of TruthfulQA reference answers, scored as lm-eval's utils.bleu and
    utils.rouge score them (sacrebleu corpus_bleu, rouge-score's rougeLsum, both x 100)."""
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    from lmforge.eval.truthfulqa import load_truthfulqa

    rows = load_truthfulqa(REPO / "datasets/eval/truthfulqa/TruthfulQA.csv.gz")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])
    # lm-eval's sacrebleu.corpus_bleu arguments; made once (the intl tokenizer compiles slowly)
    bleu = sacrebleu.BLEU(smooth_method="exp", smooth_value=0.0, tokenize="intl",
                          effective_order=False)  # fmt: skip
    rng = random.Random(0)
    for _ in range(300):
        answers = rng.choice(rows)["mc2_true"] + rng.choice(rows)["mc2_false"]
        hyp, ref = rng.choice(answers), rng.choice(answers)
        want = bleu.corpus_score([hyp], [[ref]]).score
        assert sentence_bleu(hyp, ref) == pytest.approx(want, abs=1e-9), (hyp, ref)
        r = scorer.score(ref, hyp)
        assert rouge_n(hyp, ref, 1) == pytest.approx(100 * r["rouge1"].fmeasure, abs=1e-9)
        assert rouge_n(hyp, ref, 2) == pytest.approx(100 * r["rouge2"].fmeasure, abs=1e-9)
        assert rouge_l(hyp, ref) == pytest.approx(100 * r["rougeLsum"].fmeasure, abs=1e-9)
