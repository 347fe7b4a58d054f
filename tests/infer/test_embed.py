"""Sentence embeddings: all-MiniLM-L6-v2 against sentence-transformers, batching invariants,
pooling, a causal model's embeddings and bad input."""

import numpy as np
import pytest
import torch

from lmforge.config import ConfigError
from lmforge.infer.embed import Embedder, pool

# made up for the tests: English and Chinese sentences of different lengths
EN = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Embeddings map sentences to vectors.",
    "short",
]
ZH = [
    "今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "猫坐在垫子上。",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder(minilm_dir)


@pytest.mark.slow  # importing sentence-transformers alone takes seconds
def test_minilm_equals_sentence_transformers(minilm, minilm_dir):
    st = pytest.importorskip("sentence_transformers", reason="the oracle: sentence-transformers")
    ref = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(EN + ZH, batch_size=3)
    ours = minilm.embed(EN + ZH, batch_size=3)
    assert ours.shape == (7, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batch_size_and_order_do_not_change_the_vectors(minilm):
    texts = EN[:3] + ZH[:2]
    one = minilm.embed(texts, batch_size=1)
    np.testing.assert_allclose(minilm.embed(texts, batch_size=4), one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(minilm.embed(texts[::-1])[::-1], one, rtol=0, atol=1e-5)


def test_similar_sentences_are_closer(minilm):
    """A sanity check on meaning (made-up sentences): a paraphrase beats an unrelated one."""
    a, b, c = minilm.embed(
        ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell."]
    )
    assert a @ b > a @ c + 0.3


def test_long_text_is_truncated_to_max_seq_length(minilm):
    ids = minilm.tokenize(["word " * 1000])[0]
    assert len(ids) == minilm.max_len == 256 and ids[0] == 101 and ids[-1] == 102  # CLS, SEP


def test_pool_mean_last_cls():
    hidden = torch.arange(12, dtype=torch.float32).view(1, 4, 3).repeat(2, 1, 1)  # made up
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean")[1], hidden[1, :2].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "last")[1], hidden[1, 1])
    torch.testing.assert_close(pool(hidden, mask, "cls")[0], hidden[0, 0])


def test_a_causal_model_embeds_with_mean_or_last_pooling(micro_pretrained):
    _, model_dir = micro_pretrained
    texts = ["Once upon a time", "话说天下大势", "a"]  # made up
    for how in ("mean", "last"):
        emb = Embedder(model_dir, pooling=how)
        one = emb.embed(texts, batch_size=1)
        np.testing.assert_allclose(emb.embed(texts, batch_size=3), one, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    # last pooling is the final normed hidden state of the last token, normalised
    emb = Embedder(model_dir, pooling="last")
    ids = emb.tokenize(texts[:1])[0]
    with torch.no_grad():
        h = emb.model.features(torch.tensor([ids]))[0, -1]
    np.testing.assert_allclose(emb.embed(texts[:1])[0], (h / h.norm()).numpy(), atol=1e-5)


def test_bad_input_is_named(tmp_path, minilm):
    with pytest.raises(ConfigError, match="config.json is missing"):
        Embedder(tmp_path)
    with pytest.raises(ConfigError, match="pooling 'max'"):
        Embedder(minilm.path, pooling="max")
    with pytest.raises(ConfigError, match="input 1 has 0 tokens"):
        minilm.embed_ids([[101, 102], []])
    with pytest.raises(TypeError, match="list of texts"):
        minilm.embed("one string")
