"""T5 span corruption (train/span.py): noise share, span count and lengths, sentinel layout,
and input/target that together give back the original tokens."""

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from lmforge.config import ConfigError
from lmforge.tokenizer import Tokenizer
from lmforge.train.span import (
    Sentinels,
    corrupt,
    noise_mask,
    save_tokenizer,
    sentinels,
    span_corrupt,
)


def spans(mask):
    """(start, length) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def test_noise_share_and_spans():
    rng = np.random.default_rng(0)
    for length in (2, 7, 100, 1000):
        mask = noise_mask(length, rng)
        n_noise = min(max(round(length * 0.15), 1), length - 1)
        assert mask.sum() == n_noise
        assert len(spans(mask)) == max(round(n_noise / 3), 1)
        assert not mask[0] and mask[-1]  # T5: a non-noise span first, a noise span last
    lengths = [n for _ in range(50) for _, n in spans(noise_mask(512, rng))]
    assert abs(np.mean(lengths) - 3.0) < 0.1  # 77 noise tokens in 26 spans: mean 2.96


def test_input_and_target_format():
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 0], bool)  # made up: noise c d and g
    tokens = [10, 11, 12, 13, 14, 15, 16, 17]  # a b c d e f g h
    inputs, targets = corrupt(tokens, mask, sentinels=[99, 98, 97], eos_id=1)
    assert inputs == [10, 11, 99, 14, 15, 98, 17, 1]
    assert targets == [99, 12, 13, 98, 16, 1]


def test_span_corrupt_restores_the_original():
    rng = np.random.default_rng(1)
    tokens = list(range(100, 300))  # made-up ids, none a sentinel
    sent = list(range(99, 0, -1))
    inputs, targets = span_corrupt(tokens, sent, eos_id=0, rng=rng)
    fill, k = {}, None
    for t in targets[:-1]:
        k = t if t in sent else k
        fill.setdefault(k, []).extend([] if t in sent else [t])
    restored = [x for t in inputs[:-1] for x in (fill[t] if t in sent else [t])]
    assert restored == tokens
    assert [t for t in inputs if t in sent] == sent[: len(fill)]  # <extra_id_0>, 1, ... in order


def word_tokenizer(path, words) -> Tokenizer:
    vocab = {"<pad>": 0, "</s>": 1} | {w: i for i, w in enumerate(words, 2)}  # made up
    tok = HFTokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        '{"bos_token": null, "eos_token": "</s>", "pad_token": "<pad>"}'
    )
    return Tokenizer.load(path)


def test_sentinels_reused_when_present(tmp_path):
    t = word_tokenizer(tmp_path / "t", ["a", "<extra_id_1>", "<extra_id_0>"])
    assert sentinels(t, 2) == Sentinels([4, 3], new=False)
    with pytest.raises(ConfigError, match="has 2 of the 3 sentinel tokens"):
        sentinels(t, 3)


def test_sentinels_appended_and_saved_when_absent(tmp_path):
    t = word_tokenizer(tmp_path / "t", ["a", "b"])
    added = sentinels(t, 3)  # three new ids after the vocabulary, counting down
    assert added == Sentinels([6, 5, 4], new=True) and added.vocab_needed == 7
    save_tokenizer(t, added, tmp_path / "out")
    again = Tokenizer.load(tmp_path / "out")
    assert sentinels(again, 3) == Sentinels([6, 5, 4], new=False)
    assert again.encode_rendered("a <extra_id_2> b") == [2, 4, 3]  # special: one id


def test_bad_arguments_are_named():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="noise_density"):
        noise_mask(10, rng, noise_density=1.5)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        noise_mask(1, rng)
    with pytest.raises(ConfigError, match="sentinel"):
        span_corrupt(list(range(10, 200)), [5], eos_id=1, rng=rng)


def test_training_steps_through_fit_pinned_losses(tmp_path):
    import torch

    from lmforge.config import PretrainConfig
    from lmforge.model.t5 import T5, T5Config
    from lmforge.train.loop import fit
    from lmforge.train.metrics import read_metrics
    from lmforge.train.optim import make_optimizer
    from lmforge.train.span import span_train_step

    torch.manual_seed(0)
    model = T5(T5Config(vocab_size=48, dim=32, d_kv=8, ffn_dim=64, n_layer=2, n_decoder_layer=2,
                        n_head=4, num_buckets=8, max_distance=16))  # fmt: skip
    cfg = PretrainConfig(max_steps=6, lr=3e-3, warmup_steps=1, log_every=1, eval_every=100,
                         save_every=100, seed=0)  # fmt: skip
    opt = make_optimizer(model, cfg, torch.device("cpu"))

    def batches():  # made-up data: counting runs mod 30 (ids 2..31), learnable in a few steps
        g = np.random.default_rng(0)
        while True:
            yield [[2 + (s + j) % 30 for j in range(40)] for s in g.integers(0, 30, 4)]

    sentinel_ids = list(range(47, 31, -1))  # <extra_id_0> = 47, counting down
    step = span_train_step(model, opt, batches(), sentinel_ids, seed=0)
    model.train()
    fit(cfg, opt, step, None, lambda *a: None, out_dir=tmp_path, desc="span")
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    # pinned from a run (torch's CPU kernels); T5's init (a head of std 1) starts far above
    # ln(48) = 3.87, and span corruption then learns the counting runs
    assert losses[:3] == pytest.approx([13.0081, 10.5087, 7.7785], abs=1e-3)
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]
