"""Sampling rules, stop rules and prompt limits."""

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.infer.generate import (
    apply_repetition_penalty,
    fit_prompt,
    generate,
    sample_next,
    stream_text,
)
from lmforge.model.transformer import GPT


def test_greedy_and_top_k_top_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    # probs ~ [0.09, 0.67, 0.24, 0.03]: top_p 0.5 keeps only the top token, 0.8 the top two
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)} == {1}
    assert {sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)} == {1, 2}


def test_repetition_penalty_matches_hf_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5]]


def test_fit_prompt():
    assert fit_prompt([1, 2, 3], 8, 4, False) == [1, 2, 3]
    with pytest.raises(ConfigError, match="the prompt has 9 tokens but the model's context is 8"):
        fit_prompt(list(range(9)), 8, 4, False)
    assert fit_prompt(list(range(9)), 8, 4, True) == [5, 6, 7, 8]
    with pytest.raises(ConfigError, match="empty"):
        fit_prompt([], 8, 4, False)


class CharTok:
    """A stand-in tokenizer over bytes, enough to test text streaming and stop strings."""

    eos_id = 0

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_generate_is_seeded_and_respects_limits():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, dim=32, n_layer=1, n_head=2, max_seq_len=16)).eval()
    a = list(generate(model, [1, 2, 3], 8, temperature=1.0, seed=5))
    b = list(generate(model, [1, 2, 3], 8, temperature=1.0, seed=5))
    assert a == b and len(a) == 8
    assert len(list(generate(model, [1, 2, 3], 100))) == 13  # stops at the end of the context
    greedy = list(generate(model, [1, 2, 3], 5))
    with torch.no_grad():  # greedy equals argmax of a full forward pass at each step
        ids = [1, 2, 3]
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[3:]


def test_stream_text_stops_before_stop_string(monkeypatch):
    import lmforge.infer.generate as gen

    text = "héllo world<stop>more".encode()
    monkeypatch.setattr(gen, "generate", lambda *a, **k: iter(list(text)))
    pieces = list(stream_text(None, CharTok(), [1], stop=["<stop>"]))
    assert "".join(pieces) == "héllo world"
    assert all("\ufffd" not in p for p in pieces)  # never emits half a UTF-8 character
    monkeypatch.setattr(gen, "generate", lambda *a, **k: iter(list(b"abc") + [0, 100]))
    assert "".join(stream_text(None, CharTok(), [1])) == "abc"  # EOS ends the text
