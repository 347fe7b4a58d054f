"""Sampling rules, stop rules and prompt limits."""

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.infer.generate import (
    TextStream,
    apply_repetition_penalty,
    ban_tokens,
    banned_mask,
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


# --------------------------------------------------------------------------- hostile sampling


@pytest.mark.parametrize("top_p", [0.0, 1e-46, 1e-45, 1e-30])
def test_tiny_top_p_keeps_the_most_likely_token(top_p):
    """top_p ~ 0 used to drop every token (all -inf -> NaN -> multinomial raises)."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 0.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, 1.0, top_p=top_p, generator=g).tolist() == [1, 3]
    assert sample_next(logits, 1e-5, top_k=2, top_p=top_p, generator=g).tolist() == [1, 3]


@pytest.mark.parametrize("penalty", [1e-39, 1e-30, 1e30, 1e39])
def test_extreme_repetition_penalty_stays_finite(penalty):
    logits = torch.tensor([[2.0, -1.0, 0.5, 30.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, penalty)
    assert torch.isfinite(out).all() and out[0, 2:].tolist() == [0.5, 30.0]
    g = torch.Generator().manual_seed(0)
    draw = sample_next(out, 1.0, top_p=0.9, generator=g).item()  # used to raise on NaN
    assert draw == (0 if penalty < 1 else 3)  # a tiny penalty makes a seen token dominate


def test_ban_tokens_is_a_pure_mask():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    banned = banned_mask([1, 3], stop_ids=[3], vocab_size=4)  # a stop id stays reachable
    assert banned.tolist() == [[False, True, False, False]]
    assert ban_tokens(logits, banned).tolist() == [[1.0, float("-inf"), 2.0, 0.0]]
    assert sample_next(ban_tokens(logits, banned)).tolist() == [2]  # greedy too
    assert banned_mask([1], stop_ids=[1], vocab_size=4) is None
    assert ban_tokens(logits, None) is logits


@pytest.fixture(scope="module")
def micro_model(micro_pretrained):
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    model_dir = micro_pretrained[1]
    return load_model(model_dir), Tokenizer.load(model_dir)


def _favour(boosts: dict[int, float]):
    """A stand-in for the repetition penalty that pushes some ids' logits up (a model that
    loves BOS, as the tiny run's did)."""

    def penalty(logits, seen, p):
        logits = logits.clone()
        for i, b in boosts.items():
            logits[:, i] += b
        return logits

    return penalty


def test_special_tokens_are_never_sampled(micro_model, monkeypatch):
    import lmforge.infer.generate as gen

    model, tok = micro_model
    specials = set(gen.special_ids(tok, model.cfg.vocab_size))
    assert {tok.bos_id, tok.eos_id, tok.pad_id, tok.token_id("<|reserved_0|>")} <= specials
    prompt = [tok.bos_id] + tok.encode("话说")
    monkeypatch.setattr(gen, "apply_repetition_penalty", _favour({tok.bos_id: 1e3}))
    for temperature in (0.0, 1.0):
        text = "".join(stream_text(model, tok, prompt, max_new_tokens=12, temperature=temperature))
        assert "<|" not in text and text, text  # was "<|bos|><|bos|>..."
        ids = list(generate(model, prompt, 12, temperature, seed=0, banned=sorted(specials)))
        assert len(ids) == 12 and not specials & set(ids), ids
    # a stop id is still sampled, and stops: EOS favoured (less than BOS) ends at once
    boost = _favour({tok.bos_id: 1e3, tok.eos_id: 5e2})
    monkeypatch.setattr(gen, "apply_repetition_penalty", boost)
    assert list(generate(model, prompt, 12, banned=sorted(specials), stop_ids=[tok.eos_id])) == [
        tok.eos_id
    ]
    assert "".join(stream_text(model, tok, prompt, max_new_tokens=12)) == ""
    # no stop ids (ignore_eos): EOS is banned like any special token; max_new_tokens ordinary ids
    ids = list(generate(model, prompt, 12, banned=sorted(specials), stop_ids=()))
    assert len(ids) == 12 and not specials & set(ids)


# --------------------------------------------------------------------------- TextStream


class _ReferenceTextStream:
    """The TextStream before it was incremental (decodes everything, scans the whole text every
    token), kept as the reference for what the incremental one must hand out."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids, self.emitted, self.stopped, self.text = [], 0, False, ""

    def push(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text, max(cut, self.emitted))
        hold = max(
            (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        return self._emit(text, len(text) - hold)

    def flush(self):
        return "" if self.stopped else self._emit(self.tokenizer.decode(self.ids), None)

    def _emit(self, text, end):
        end = len(text) if end is None else end
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        self.text += piece
        return piece


class ChunkTok:
    """A stand-in tokenizer whose token i is the byte string chunks[i] (made-up test data)."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.decoded_lengths = []  # len(ids) of every decode call

    def decode(self, ids):
        self.decoded_lengths.append(len(ids))
        return b"".join(self.chunks[i] for i in ids).decode("utf-8", errors="replace")


def _stream(cls, chunks, stops):
    s = cls(ChunkTok(chunks), stops)
    pieces = []
    for i in range(len(chunks)):
        pieces.append(s.push(i))
        if s.stopped:
            break
    pieces.append(s.flush())
    return pieces, s.stopped, s.text


@pytest.mark.parametrize(
    "chunks, stops, text",
    [
        ([b"ab", b"c<s", b"to", b"p>tail"], ["<stop>"], "abc"),  # split across three tokens
        ([b"\xe4", b"\xb8", b"\xad", b"\xe6\x96\x87"], ["文"], "中"),  # multi-byte, byte tokens
        ([b"xx<st", b"<stop>"], ["<stop>"], "xx<st"),  # the held tail was not the stop after all
        ([b"ab", b"cd"], ["abcd", "c"], ""),  # the earliest start wins, not the earliest end
        ([b"ab", b"c", b"d"], ["abcd", "c"], "ab"),  # ...among what has appeared so far
        ([b"aab", b"aaab"], ["aaab"], "aab"),  # a partial match restarts mid-way (KMP borders)
        ([b"x", b"\x80", b"y"], ["y"], "x\ufffd"),  # an invalid byte is text once followed
        ([b"hello"], ["", "lo!"], "hello"),  # "" is ignored; a held prefix comes out in flush
    ],
)
def test_text_stream_stops(chunks, stops, text):
    got = _stream(TextStream, chunks, stops)
    assert got == _stream(_ReferenceTextStream, chunks, stops) and got[2] == text


def test_text_stream_equals_the_reference_on_random_text():
    """Random texts (made up from a few ASCII, accented and CJK characters, sometimes an invalid
    byte) cut at random byte positions into tokens, with random stop strings."""
    import random

    rng = random.Random(0)
    alphabet = "ab中é\n"
    for _ in range(3000):
        data = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))).encode()
        cuts = (
            sorted(rng.sample(range(1, len(data)), rng.randint(0, len(data) - 1))) if data else []
        )
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])] if data else []
        if rng.random() < 0.1:
            chunks.insert(rng.randint(0, len(chunks)), b"\x80")
        stops = ["".join(rng.choices(alphabet, k=rng.randint(0, 4))) for _ in range(4)]
        want = _stream(_ReferenceTextStream, chunks, stops)
        assert _stream(TextStream, chunks, stops) == want, (chunks, stops)


def test_text_stream_cost_does_not_grow_with_the_text(monkeypatch):
    """Counted, not timed: every decode sees a few ids, and each stop matcher examines each new
    character once, however long the output (20 000 tokens, 4 stops of 256 characters)."""
    import lmforge.infer.generate as gen

    fed = []
    feed = gen._StopMatcher.feed
    monkeypatch.setattr(
        gen._StopMatcher, "feed", lambda m, text: fed.append(len(text)) or feed(m, text)
    )
    chunks = [b"ab", b"\xe4\xb8", b"\xad", b" ", b"x"]  # made-up tokens: "ab", half of 中, ...
    ids = [i % len(chunks) for i in range(20_000)]
    tok = ChunkTok(chunks)
    stops = [("ab中 x" * 60)[:255] + "!", "z" * 256, "中" * 256, "ab" * 128]
    stream = TextStream(tok, stops)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert max(tok.decoded_lengths) <= 3  # the window: a token or two, plus one unfinished
    text = ChunkTok(chunks).decode(ids)
    assert not stream.stopped and "".join(pieces) == text
    assert sum(fed) == 4 * len(text)
