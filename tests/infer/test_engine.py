"""The engine: ragged batched decoding against the full forward, continuous batching, batch
invariance of greedy outputs, stop rules, logprobs, streaming, cancellation and limits."""

import threading

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, ModelConfig
from lmforge.infer.engine import Engine, QueueFull, SamplingParams, decode_step
from lmforge.model.checkpoint import load_model
from lmforge.model.transformer import GPT
from lmforge.tokenizer import Tokenizer

ARCHS = {
    "llama-gqa": dict(n_kv_head=2),
    "qwen2-bias": dict(arch="qwen2", qkv_bias=True, n_kv_head=2),
    "mistral-window": dict(arch="mistral", sliding_window=5),
    "mixtral-moe": dict(arch="mixtral", mlp="moe", n_experts=4, experts_per_token=2, n_kv_head=2),
    "gpt2": dict(
        arch="gpt2", norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, bias=True
    ),
}


@pytest.mark.parametrize("name", ARCHS)
def test_decode_step_matches_the_full_forward(name):
    """Rows at different positions in one step: each row's logits are what a full forward
    over its own sequence gives at its last position (fp32, max abs diff <= 1e-4)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layer=2, n_head=4, max_seq_len=32, **ARCHS[name])
    model = GPT(cfg).eval()
    for p in model.parameters():  # biases start at zero: make them count
        torch.nn.init.normal_(p, 0.0, 0.1)
    seqs = [torch.randint(0, 97, (n,)) for n in (3, 9, 1, 14)]
    cache = model.new_cache(len(seqs))
    with torch.no_grad():
        for i, s in enumerate(seqs):  # prefill all but the last token into each row
            if len(s) > 1:
                model(s[:-1].view(1, -1), cache.rows(i, 1), 0)
        tokens = torch.stack([s[-1] for s in seqs])
        pos = torch.tensor([len(s) - 1 for s in seqs])
        got = decode_step(model, tokens, pos, cache)
        for i, s in enumerate(seqs):
            want = model(s.view(1, -1))[0, -1]
            assert (got[i] - want).abs().max().item() < 1e-4, f"row {i}"


@pytest.fixture(scope="module")
def served(micro_pretrained):
    model_dir = micro_pretrained[1]
    return load_model(model_dir), Tokenizer.load(model_dir)


def _prompts(tok, n=10):
    texts = ["Once upon a time", "话说", "The", "In the year", "宝玉", "She", "A", "It was", "中国"]
    return [[tok.bos_id] + tok.encode(texts[i % len(texts)] + " " * (i // 9)) for i in range(n)]


def _alone(model, tok, prompt, params):
    engine = Engine(model, tok, max_batch=4)
    req = engine.submit(prompt, params)
    engine.run_until_done()
    return req


def test_batched_greedy_equals_alone_and_slots_refill_at_once(served):
    model, tok = served
    prompts = _prompts(tok)
    lengths = [3 + 2 * i for i in range(len(prompts))]  # requests finish at different steps
    alone = [_alone(model, tok, p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, lengths)]
    engine = Engine(model, tok, max_batch=4)
    reqs = [engine.submit(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, lengths)]
    history = []
    while engine.step():
        history.append({s.req.id for s in engine.slots if s is not None})
        # continuous batching: no slot stays empty while a request waits
        assert engine.pending() == 0 or engine.active() == engine.max_batch
    assert [r.output_ids for r in reqs] == [r.output_ids for r in alone]
    assert all(r.finish_reason == "length" for r in reqs)
    assert [len(r.output_ids) for r in reqs] == lengths
    assert max(len(h) for h in history) == 4 and len(history) < sum(lengths)


def test_seeded_sampling_is_reproducible_in_any_company(served):
    model, tok = served
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    alone = _alone(model, tok, _prompts(tok)[0], params).output_ids
    engine = Engine(model, tok, max_batch=3)
    others = [
        engine.submit(p, SamplingParams(max_tokens=9, seed=i))
        for i, p in enumerate(_prompts(tok, 4))
    ]
    mine = engine.submit(_prompts(tok)[0], params)
    engine.run_until_done()
    assert mine.output_ids == alone and all(o.done for o in others)
    other_seed = _alone(
        model, tok, _prompts(tok)[0], SamplingParams(**{**params.__dict__, "seed": 8})
    )
    assert other_seed.output_ids != alone


def test_stop_strings_stop_ids_streaming_and_logprobs(served):
    model, tok = served
    prompt = _prompts(tok)[0]
    full = _alone(model, tok, prompt, SamplingParams(max_tokens=20, logprobs=True))
    assert full.text == tok.decode(full.output_ids)
    # a stop string taken from the middle of the greedy text: output ends right before it
    cut = len(full.text) // 2
    stop = full.text[cut : cut + 3]
    pieces, done = [], []
    req = _alone(
        model,
        tok,
        prompt,
        SamplingParams(max_tokens=20, stop=[stop]),
    )
    assert req.finish_reason == "stop" and req.text == full.text[: full.text.find(stop)]
    engine = Engine(model, tok, max_batch=2)
    req = engine.submit(
        prompt,
        SamplingParams(max_tokens=20, stop_ids=[full.output_ids[5]]),
        on_event=lambda r, piece, end: (done if end else pieces).append(piece),
    )
    engine.run_until_done()
    first = full.output_ids.index(full.output_ids[5])
    assert req.output_ids == full.output_ids[:first] and req.finish_reason == "stop"
    assert "".join(pieces) == req.text and done == [""]
    # logprobs of greedy tokens are the log-softmax of the full forward at each position
    ids = torch.tensor([prompt + full.output_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].float(), dim=-1)
    want = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(full.output_ids)]
    assert max(abs(a - b) for a, b in zip(full.logprobs, want)) < 1e-4


def test_cancel_frees_the_slot_and_leaves_others_alone(served):
    model, tok = served
    prompts = _prompts(tok, 3)
    alone = [_alone(model, tok, p, SamplingParams(max_tokens=15)).output_ids for p in prompts]
    engine = Engine(model, tok, max_batch=2)
    reqs = [engine.submit(p, SamplingParams(max_tokens=15)) for p in prompts]
    engine.step()
    engine.step()
    reqs[0].cancel()
    engine.step()  # the cancelled row leaves; the waiting request takes its slot
    assert reqs[0].finish_reason == "cancelled" and reqs[2].id in {
        s.req.id for s in engine.slots if s is not None
    }
    engine.run_until_done()
    assert [r.output_ids for r in reqs[1:]] == alone[1:]


def test_limits_and_bad_requests(served):
    model, tok = served
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    engine.submit([1, 2], SamplingParams(max_tokens=3))
    engine.step()  # running
    engine.submit([1, 2], SamplingParams(max_tokens=3))  # waiting: the queue is now full
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([1, 2], SamplingParams(max_tokens=3))
    for prompt, params, match in [
        ([], SamplingParams(), "empty"),
        (list(range(model.cfg.max_seq_len)), SamplingParams(), "context is 64"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
        ([1, 10**6], SamplingParams(), "outside the vocabulary"),
    ]:
        with pytest.raises(ConfigError, match=match):
            engine.submit(prompt, params)
    engine.run_until_done()
    # the context rule: a prompt one short of the context gets exactly one token
    req = _alone(model, tok, [1] * (model.cfg.max_seq_len - 1), SamplingParams(max_tokens=50))
    assert len(req.output_ids) == 1 and req.finish_reason == "length"


def test_background_thread_and_shutdown(served):
    model, tok = served
    engine = Engine(model, tok, max_batch=2)
    engine.start()
    finished = threading.Event()
    req = engine.submit(
        _prompts(tok)[1],
        SamplingParams(max_tokens=5),
        on_event=lambda r, p, end: end and finished.set(),
    )
    assert finished.wait(30) and req.finish_reason == "length"
    long = [engine.submit(p, SamplingParams(max_tokens=60)) for p in _prompts(tok, 3)]
    engine.shutdown(cancel=True, timeout=30)
    assert all(r.done for r in long)
    assert {r.finish_reason for r in long} <= {"cancelled", "length"}


def test_without_batch_invariance_only_busy_rows_run(served):
    model, tok = served
    engine = Engine(model, tok, max_batch=4, batch_invariant=False)
    reqs = [
        engine.submit(p, SamplingParams(max_tokens=6 + i)) for i, p in enumerate(_prompts(tok, 6))
    ]
    engine.run_until_done()
    assert [len(r.output_ids) for r in reqs] == [6 + i for i in range(6)]
    alone = _alone(model, tok, _prompts(tok)[0], SamplingParams(max_tokens=6))
    solo = Engine(model, tok, max_batch=4, batch_invariant=False)
    r = solo.submit(_prompts(tok)[0], SamplingParams(max_tokens=6, logprobs=True))
    solo.run_until_done()  # one busy row: a one-row step, same tokens as the full-width one here
    assert r.output_ids == alone.output_ids


# --------------------------------------------------------------------------- one request fails


def _fail_for_top_k(k: int, real):
    """sample_next that raises for requests with top_k == k only (an injected per-request bug)."""

    def sample(logits, temperature, top_k, top_p, gen):
        if top_k == k:
            raise RuntimeError("injected sampling failure")
        return real(logits, temperature, top_k, top_p, gen)

    return sample


def _run(engine, reqs, timeout=30):
    assert all(r.wait(timeout) for r in reqs), "a request never finished: the engine died?"


def test_a_failing_request_ends_alone_and_the_engine_goes_on(served, monkeypatch):
    import lmforge.infer.engine as engine_mod

    model, tok = served
    prompts = _prompts(tok, 3)
    want = [_alone(model, tok, p, SamplingParams(max_tokens=8)).output_ids for p in prompts]
    monkeypatch.setattr(engine_mod, "sample_next", _fail_for_top_k(7, engine_mod.sample_next))
    engine = Engine(model, tok, max_batch=2)
    engine.start()
    try:
        good = engine.submit(prompts[0], SamplingParams(max_tokens=8))
        bad = engine.submit(prompts[1], SamplingParams(max_tokens=8, top_k=7))
        _run(engine, [good, bad])
        assert bad.finish_reason == "error" and "injected sampling failure" in bad.error
        assert good.finish_reason == "length" and good.output_ids == want[0]
        # a failure mid-way (after some tokens), then the freed slot serves the next request
        calls = {"n": 0}
        real = engine_mod.decode_step

        def flaky(*args, **kwargs):  # the shared batched forward fails once
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected forward failure")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine_mod, "decode_step", flaky)
        hit = [engine.submit(p, SamplingParams(max_tokens=8)) for p in prompts[:2]]
        _run(engine, hit)
        assert {r.finish_reason for r in hit} == {"error"} and "forward" in hit[0].error
        after = engine.submit(prompts[2], SamplingParams(max_tokens=8))
        _run(engine, [after])
        assert after.output_ids == want[2] and engine.is_alive()
    finally:
        engine.shutdown(cancel=True, timeout=30)


def test_a_failing_callback_or_prefill_fails_only_its_request(served, monkeypatch):
    model, tok = served
    prompts = _prompts(tok, 2)
    engine = Engine(model, tok, max_batch=2)

    def boom(req, piece, done):
        if not done:
            raise ValueError("the client's callback broke")

    bad = engine.submit(prompts[0], SamplingParams(max_tokens=8), on_event=boom)
    good = engine.submit(prompts[1], SamplingParams(max_tokens=8))
    engine.run_until_done()
    assert bad.finish_reason == "error" and "callback broke" in bad.error
    assert good.finish_reason == "length" and len(good.output_ids) == 8
    # a request that fails at admission (here: a seed torch refuses) ends alone
    bad = engine.submit(prompts[0], SamplingParams(max_tokens=8, seed=2**64))
    good = engine.submit(prompts[1], SamplingParams(max_tokens=8))
    engine.run_until_done()
    assert bad.finish_reason == "error" and good.finish_reason == "length"
    assert engine.active() == 0


def test_extreme_sampling_values_just_work(served):
    """Inside the API's ranges but numerically extreme: these used to raise in the engine."""
    model, tok = served
    engine = Engine(model, tok, max_batch=4)
    greedy = engine.submit(_prompts(tok)[0], SamplingParams(max_tokens=6))
    reqs = [
        engine.submit(_prompts(tok)[0], SamplingParams(max_tokens=6, temperature=t, **kw))
        for t, kw in [
            (1.0, dict(top_p=1e-46)),
            (1.0, dict(top_p=1e-45)),
            (1e-5, dict(top_k=1)),
            (1.0, dict(repetition_penalty=1e-39)),
            (2.0, dict(repetition_penalty=1e39, top_p=1e-30)),
        ]
    ]
    engine.run_until_done()
    assert all(r.finish_reason in ("length", "stop") and r.error is None for r in reqs)
    # top_p ~ 0 keeps the most likely token only: greedy
    assert reqs[0].output_ids == reqs[1].output_ids == greedy.output_ids


# --------------------------------------------------------------------------- special tokens


def test_special_tokens_are_never_sampled_but_stop_ids_stop(served, monkeypatch):
    import lmforge.infer.engine as engine_mod

    model, tok = served
    specials = {tok.token_id(t) for t in tok.special_tokens()}  # <|bos|>, <|pad|>, ...
    real = engine_mod.apply_repetition_penalty

    def favour(boosts):  # a model that loves BOS (the tiny run's did): boost some logits
        def penalty(logits, seen, p):
            logits = real(logits, seen, p).clone()
            for i, b in boosts.items():
                logits[:, i] += b
            return logits

        return penalty

    monkeypatch.setattr(engine_mod, "apply_repetition_penalty", favour({tok.bos_id: 1e3}))
    engine = Engine(model, tok, max_batch=2)
    reqs = [
        engine.submit(_prompts(tok)[1], SamplingParams(max_tokens=10, temperature=t, seed=0))
        for t in (0.0, 1.0)
    ]
    engine.run_until_done()
    for r in reqs:
        assert len(r.output_ids) == 10 and not specials & set(r.output_ids)
        assert "<|" not in r.text
    boosts = {tok.bos_id: 1e3, tok.eos_id: 5e2, tok.token_id("<|im_end|>"): 1e2}
    monkeypatch.setattr(engine_mod, "apply_repetition_penalty", favour(boosts))
    stop = engine.submit(_prompts(tok)[1], SamplingParams(max_tokens=10, stop_ids=[tok.eos_id]))
    ignore_eos = engine.submit(_prompts(tok)[1], SamplingParams(max_tokens=10, stop_ids=()))
    engine.run_until_done()
    assert stop.finish_reason == "stop" and stop.stop_token == tok.eos_id and not stop.output_ids
    assert len(ignore_eos.output_ids) == 10 and not specials & set(ignore_eos.output_ids)


def test_logprobs_are_the_models_own_before_temperature(served):
    """vLLM and OpenAI report the model's log-probabilities: not scaled by the temperature, nor
    by the repetition penalty."""
    model, tok = served
    prompt = _prompts(tok)[0]
    params = SamplingParams(
        max_tokens=10, temperature=0.7, repetition_penalty=1.3, seed=3, logprobs=True
    )
    req = _alone(model, tok, prompt, params)
    ids = torch.tensor([prompt + req.output_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].float(), dim=-1)
    want = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(req.output_ids)]
    assert len(want) == 10 and max(abs(a - b) for a, b in zip(req.logprobs, want)) < 1e-4
