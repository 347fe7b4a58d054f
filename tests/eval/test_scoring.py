"""loglikelihood against transformers' Llama on the same checkpoint; perplexity's windows."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.eval.scoring import loglikelihood, perplexity
from lmforge.model.checkpoint import load_model
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def micro(micro_pretrained):
    _, model_dir = micro_pretrained
    return load_model(model_dir), Tokenizer.load(model_dir), model_dir


def _requests(vocab_size, max_len):
    g = torch.Generator().manual_seed(0)
    lengths = [(1, 1), (5, 3), (12, 1), (30, 10), (2, 20), (50, 14), (7, 7), (max_len + 20, 5)]
    return [
        (
            torch.randint(3, vocab_size, (c,), generator=g).tolist(),
            torch.randint(3, vocab_size, (n,), generator=g).tolist(),
        )
        for c, n in lengths
    ]


def test_loglikelihood_matches_hf_llama(micro):
    transformers = pytest.importorskip("transformers")
    model, _, model_dir = micro
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    L = model.cfg.max_seq_len
    requests = _requests(model.cfg.vocab_size, L)
    ours = loglikelihood(model, requests, batch_size=3)
    for (ctx, cont), (ll, greedy) in zip(requests, ours):
        full = (ctx + cont)[-(L + 1) :]  # the long context loses its oldest tokens
        with torch.no_grad():
            logp = hf(torch.tensor([full[:-1]])).logits[0].log_softmax(-1)  # (T, V)
        pos = torch.arange(len(full) - 1 - len(cont), len(full) - 1)
        tgt = torch.tensor(cont)
        assert ll == pytest.approx(logp[pos, tgt].sum().item(), abs=1e-4)  # fp32 on CPU: ~1e-6 seen
        assert greedy == bool((logp[pos].argmax(-1) == tgt).all())


def test_loglikelihood_batched_equals_one_at_a_time(micro):
    model = micro[0]
    requests = _requests(model.cfg.vocab_size, model.cfg.max_seq_len)
    batched = loglikelihood(model, requests, batch_size=8)
    single = loglikelihood(model, requests, batch_size=1)
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
    # the memorised case: a continuation equal to the model's own greedy tokens is greedy
    ctx = requests[1][0]
    nxt = model(torch.tensor([ctx]))[0, -1].argmax().item()
    assert loglikelihood(model, [(ctx, [nxt])])[0][1]


def _chunked_loss(model, ids):
    """Reference: independent chunks of the context; each chunk's first token is unscored."""
    L = model.cfg.max_seq_len
    nats, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), L):
            chunk = torch.tensor([ids[i : i + L]])
            if chunk.shape[1] < 2:
                continue
            logits = model(chunk[:, :-1])[0]
            nats += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
    return nats / n, n


def test_perplexity_stride_context_is_chunking(micro):
    model, tok, _ = micro
    ids = torch.randint(
        3, model.cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    L = model.cfg.max_seq_len
    out = perplexity(model, tok, ids, stride=L)
    loss, n = _chunked_loss(model, ids)
    assert out["tokens"] == n
    assert out["loss"] == pytest.approx(loss, abs=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    # overlapping windows score every token but the first exactly once, with more history
    assert perplexity(model, tok, ids, stride=L // 4)["tokens"] == len(ids) - 1
    # a string gets BOS first, and bits per byte covers its bytes
    text = "Once upon a time there was a little fox who lived in the forest."
    out = perplexity(model, tok, text, stride=16)
    assert out["tokens"] == len(tok.encode(text))
    assert out["bits_per_byte"] == pytest.approx(
        out["loss"] * out["tokens"] / math.log(2) / len(text.encode())
    )


def test_uniform_model_perplexity_is_vocab_size(micro):
    model, tok, _ = micro
    uniform = copy.deepcopy(model)
    uniform.lm_head.weight = torch.nn.Parameter(torch.zeros_like(uniform.lm_head.weight))  # unties
    out = perplexity(uniform, tok, "The quick brown fox jumps over the lazy dog. " * 8, stride=32)
    assert out["perplexity"] == pytest.approx(model.cfg.vocab_size, rel=1e-5)


def test_shared_context_scoring_equals_one_request_at_a_time(micro_pretrained):
    """Choices that continue one context by a single token share its forward: same numbers."""
    from lmforge.eval.scoring import loglikelihood
    from lmforge.model.checkpoint import load_model

    model = load_model(micro_pretrained[1]).eval()
    ctx = [1, 40, 41, 42, 43]
    reqs = [(ctx, [t]) for t in (50, 51, 52, 53)] + [(ctx[:3], [7, 8]), ([1, 9], [10])]
    shared = loglikelihood(model, reqs, batch_size=4, share_context=True)
    alone = loglikelihood(model, reqs, batch_size=1, share_context=False)
    for (a, ga), (b, gb) in zip(shared, alone):
        assert abs(a - b) < 1e-5 and ga == gb


def test_continuations_of_one_context_read_it_once_with_the_same_numbers(micro_pretrained):
    """Longer continuations of one context (TruthfulQA's answers) continue a KV cache of it:
    the same sums and greedy flags as reading each request whole, also across batches of
    continuations and beside requests of other contexts."""
    model = load_model(micro_pretrained[1]).eval()
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(3, model.cfg.vocab_size, (40,), generator=g).tolist()
    conts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in
             (2, 9, 3, 17, 5, 2, 11)]  # fmt: skip
    greedy = [model(torch.tensor([ctx]))[0, -1].argmax().item()]
    greedy.append(model(torch.tensor([ctx + greedy]))[0, -1].argmax().item())
    reqs = [(ctx, c) for c in conts] + [(ctx, greedy), (ctx[:7], [5, 6, 7])]
    shared = loglikelihood(model, reqs, batch_size=3, share_context=True)
    alone = loglikelihood(model, reqs, batch_size=1, share_context=False)
    for (a, ga), (b, gb) in zip(shared, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert shared[len(conts)][1]  # the model's own greedy tokens are greedy after the cache
