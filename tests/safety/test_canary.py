"""Canary exposure: the formula against hand-computed ranks, and the batched candidate scoring
against one plain forward pass per candidate."""

import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.transformer import GPT
from lmforge.safety.canary import (
    Canary,
    canary_exposures,
    canary_text,
    candidate_scores,
    exposure,
    insert_canaries,
    make_canaries,
)


class CharTokenizer:
    """Made up for the test: one id per character, so " 7" is two pieces (space, digit) and the
    scoring has to carry the shared space before the last digit."""

    alphabet = " 0123456789abcdefghijklmnopqrstuvwxyz"

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]


def test_exposure_worked_example():
    # 8 candidates (made-up log-perplexities); candidate 5 (score 1.0) has one strictly lower
    # score (0.5) below it, so rank 2: exposure = log2 8 - log2 2 = 2
    scores = torch.tensor([3.0, 0.5, 2.0, 4.0, 2.5, 1.0, 6.0, 5.0])
    assert exposure(scores, 5) == pytest.approx(2.0)
    assert exposure(scores, 1) == pytest.approx(3.0)  # the most likely: rank 1, log2 8
    assert exposure(scores, 6) == pytest.approx(0.0)  # the least likely: rank 8
    # a tie counts in the canary's favour: 1.0 ties 1.0 -> rank 2 (only 0.5 is lower)
    tied = torch.tensor([1.0, 0.5, 1.0, 9.0])
    assert exposure(tied, 2) == pytest.approx(math.log2(4) - math.log2(2))


def _plain_score(model, tok, digits, start):
    """-sum log p(digit tokens | start + prefix), one forward pass of the whole sentence."""
    prefix = start + tok.encode("my secret number is")
    ids = prefix + tok.encode(canary_text(digits))[len(prefix) - len(start) :]
    logp = torch.log_softmax(model(torch.tensor([ids])).float(), -1)[0]
    return -sum(logp[i - 1, ids[i]].item() for i in range(len(prefix), len(ids)))


def test_candidate_scores_match_one_pass_per_candidate():
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = GPT(ModelConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, max_seq_len=64)).eval()
    start = [40]  # a made-up document-start id
    scores = candidate_scores(model, tok, 2, start, batch_size=7)  # batches cut mid-way
    assert scores.shape == (100,)
    for value in (0, 7, 42, 99):
        want = _plain_score(model, tok, str(value).zfill(2), start)
        assert scores[value].item() == pytest.approx(want, rel=1e-4, abs=1e-4)
    rows = canary_exposures(model, tok, [Canary("42", 4)], start)
    assert rows[0]["rank"] == 1 + int((scores < scores[42]).sum())
    assert rows[0]["candidates"] == 100


def test_make_and_insert_canaries():
    canaries = make_canaries([1, 4], per_count=3, n_digits=5, seed=1)
    assert len({c.digits for c in canaries}) == 6
    assert [c.copies for c in canaries] == [1, 1, 1, 4, 4, 4]
    docs = [f"made-up document {i}" for i in range(10)]
    out = insert_canaries(docs, canaries, seed=1)
    assert len(out) == 10 + 3 + 12
    assert [d for d in out if d.startswith("made-up")] == docs  # order of the corpus kept
    assert out.count(canaries[4].text) == 4


def test_tokenizer_that_merges_digits_is_refused():
    class Merging(CharTokenizer):
        def encode(self, text):  # made up: "1 2" becomes one token
            return super().encode(text.replace("1 2", "z"))

    model = GPT(ModelConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, max_seq_len=64)).eval()
    with pytest.raises(ValueError, match="merges"):
        candidate_scores(model, Merging(), 3)
