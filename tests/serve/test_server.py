"""The OpenAI-compatible server, driven over real HTTP: the official `openai` client gets the
engine's own greedy answers and exact token counts, streamed or not; parallel clients get what
they get alone; bad requests get OpenAI error bodies with the right status and the server keeps
serving; a client that disconnects frees its slot; a full queue answers 429."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from lmforge.infer.chat import chat_prompt_ids, stop_ids  # noqa: E402
from lmforge.infer.engine import Engine, SamplingParams  # noqa: E402
from lmforge.model.load import load  # noqa: E402
from lmforge.serve.app import create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "Name a color."}]


def _client(url, key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def _alone(micro, prompt_ids, max_tokens, ids):
    """The reference: the engine alone, with the server's slot count (4)."""
    model, tok, _ = micro
    engine = Engine(model, tok, max_batch=4)
    req = engine.submit(prompt_ids, SamplingParams(max_tokens=max_tokens, stop_ids=ids))
    engine.run_until_done()
    return req


def _assert_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------- the openai client


def test_chat_matches_the_engine_with_exact_usage(server, micro, caplog):
    url, _ = server
    tok = micro[1]
    caplog.set_level(logging.INFO, logger="lmforge.serve")
    r = _client(url).chat.completions.create(
        model="micro", messages=HELLO, max_tokens=12, temperature=0
    )
    prompt = chat_prompt_ids(tok, HELLO)
    want = _alone(micro, prompt, 12, stop_ids(tok))
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "micro"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(want.output_ids)
    assert r.usage.total_tokens == len(prompt) + len(want.output_ids)
    line = [m for m in caplog.messages if m.startswith(r.id)]
    assert line and f"prompt={len(prompt)} completion={len(want.output_ids)}" in line[0]


def test_chat_streaming_equals_non_streaming(server):
    url, _ = server
    client = _client(url)
    args = dict(model="micro", messages=HELLO, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == full.choices[0].finish_reason and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_completions_streaming_and_not(server, micro):
    url, _ = server
    tok = micro[1]
    client = _client(url)
    r = client.completions.create(model="micro", prompt="Once upon a time", max_tokens=10, temperature=0)  # fmt: skip
    prompt = [tok.bos_id] + tok.encode("Once upon a time")
    want = _alone(micro, prompt, 10, (tok.eos_id,))
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(want.output_ids))
    chunks = list(
        client.completions.create(
            model="micro", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_models_health_and_logprobs(server):
    url, _ = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["micro"]
    assert client.models.retrieve("micro").id == "micro"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stop", "seed", "stream", "logprobs"])
    resp = httpx.post(f"{url}/v1/chat/completions", json={**nulls, "messages": HELLO}, timeout=30)
    assert resp.status_code == 200, resp.text  # null means "the default", as clients send it
    r = client.chat.completions.create(
        model="micro", messages=HELLO, max_tokens=5, temperature=0, logprobs=True
    )
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens and all(lp.logprob <= 0 for lp in lps)
    assert "".join(lp.token for lp in lps).startswith(r.choices[0].message.content[:1])


def test_seeded_sampling_is_reproducible(server):
    url, _ = server
    client = _client(url)
    args = dict(model="micro", prompt="The", max_tokens=16, temperature=1.0, top_p=0.9)
    a, b = (client.completions.create(**args, seed=3).choices[0].text for _ in range(2))
    assert a == b


def test_parallel_clients_get_their_one_at_a_time_answers(server):
    url, _ = server
    client = _client(url)
    prompts = [f"{w} {i}" for i, w in enumerate(["Once", "The", "话说", "A"] * 4)]

    def ask(i):
        p = prompts[i]
        if i % 2:
            r = client.completions.create(model="micro", prompt=p, max_tokens=8 + i, temperature=0)  # fmt: skip
            return r.choices[0].text, r.usage.completion_tokens
        msgs = [{"role": "user", "content": p}]
        r = client.chat.completions.create(
            model="micro", messages=msgs, max_tokens=8 + i, temperature=0
        )
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone
    assert all(n > 0 for _, n in alone)


# --------------------------------------------------------------------------- bad requests


def _chat(**overrides):
    return {"model": "micro", "messages": HELLO, "max_tokens": 4, **overrides}


@pytest.mark.parametrize(
    "path, body, status, code",
    [
        ("/v1/chat/completions", b'{"model": "micro", "messages": [', 400, "invalid_json"),
        ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
        ("/v1/chat/completions", _chat(messages="hi"), 400, "invalid_type"),
        ("/v1/chat/completions", _chat(max_tokens="4"), 400, "invalid_type"),
        ("/v1/chat/completions", _chat(temperature="hot"), 400, "invalid_type"),
        ("/v1/chat/completions", _chat(max_tokens=-1), 400, "invalid_value"),
        ("/v1/chat/completions", _chat(max_tokens=0), 400, "invalid_value"),
        ("/v1/chat/completions", _chat(max_tokens=65), 400, None),  # over the server's limit
        ("/v1/chat/completions", _chat(messages=[{"role": "bot", "content": "x"}]), 400, None),
        ("/v1/chat/completions", _chat(n=2), 400, None),
        ("/v1/chat/completions", _chat(model="gpt-4"), 404, "model_not_found"),
        (
            "/v1/chat/completions",
            _chat(messages=[{"role": "user", "content": "word " * 200}]),
            400,
            "context_length_exceeded",
        ),
        (
            "/v1/completions",
            {"model": "micro", "prompt": "x " * 100},
            400,
            "context_length_exceeded",
        ),  # fmt: skip
        ("/v1/completions", {"model": "micro", "prompt": [10**6]}, 400, None),  # not a token id
        ("/v1/completions", {"model": "micro"}, 400, None),  # no prompt
        ("/v1/completions", _chat(messages=None, prompt="x" * 20_000), 413, "request_too_large"),
        ("/v1/nothing", {}, 404, None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    server, path, body, status, code
):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"})
    _assert_error(resp, status, code)
    # greedy: at temperature 1 the micro model's first token is <|im_end|> about 1 time in 300
    ok = httpx.post(
        f"{url}/v1/chat/completions", json=_chat(max_tokens=2, temperature=0), timeout=30
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_the_openai_client_raises_its_own_error_types(server):
    url, _ = server
    client = _client(url)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="micro", prompt="x", max_tokens=-3)


def test_api_key(micro, live_server):
    model, tok, _ = micro
    app = create_app((model, tok), "micro", api_key="s3cret", max_batch=1)
    with live_server(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, headers=headers)
            _assert_error(resp, 401, "invalid_api_key")
            _assert_error(httpx.get(f"{url}/v1/models", headers=headers), 401)
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").models.list()
        assert httpx.get(f"{url}/health").status_code == 200  # no key needed
        r = _client(url, "s3cret").completions.create(prompt="a", max_tokens=2, model="micro")
        assert r.usage.completion_tokens >= 1


# --------------------------------------------------------------------------- slots and queue


def _long_stream(url):
    """A streaming chat that holds the slow server's one slot for ~1.5 s (no stop tokens). Its
    first event (the role) comes at once; text may come later (held-back partial UTF-8)."""
    body = {**_chat(max_tokens=60), "stream": True, "ignore_eos": True}
    return httpx.stream("POST", f"{url}/v1/chat/completions", json=body)


def _wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_client_that_disconnects_frees_its_slot(slow_server):
    url, app = slow_server
    srv = app.state.server
    before = srv.finished["cancelled"]
    with _long_stream(url) as resp:
        assert resp.status_code == 200
        assert next(resp.iter_lines()).startswith("data: ")
        _wait_until(lambda: srv.engine.active() == 1, 1.0, "the request was not admitted")
    # the connection is closed: the request must be cancelled long before its ~1.5 s are up
    _wait_until(lambda: srv.engine.active() == 0, 1.0, "the request still holds its slot")
    assert srv.finished["cancelled"] == before + 1
    r = _client(url).completions.create(model="micro", prompt="The", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_a_full_queue_answers_429(slow_server):
    url, app = slow_server
    engine = app.state.server.engine
    with _long_stream(url) as resp:
        assert resp.status_code == 200
        events = resp.iter_lines()
        next(events)
        _wait_until(lambda: engine.active() == 1, 1.0, "the request was not admitted")
        busy = httpx.post(f"{url}/v1/chat/completions", json=_chat())  # 1 slot, 0 queue
        _assert_error(busy, 429, "queue_full")
        with pytest.raises(openai.RateLimitError):
            _client(url).chat.completions.create(model="micro", messages=HELLO, max_tokens=2)
        lines = [line for line in events if line]
    assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]
    _wait_until(lambda: engine.active() == 0, 1.0, "the slot was not freed")
    assert httpx.post(f"{url}/v1/chat/completions", json=_chat(), timeout=30).status_code == 200


# --------------------------------------------------------------------------- lifecycle


def test_health_is_503_while_the_model_loads(micro, live_server):
    model, tok, _ = micro
    release = threading.Event()

    def slow_load():
        release.wait(10)
        return model, tok

    with live_server(create_app(slow_load, "micro"), wait_ready=False) as url:
        resp = httpx.get(f"{url}/health")
        assert resp.status_code == 503 and resp.json()["status"] == "loading"
        _assert_error(httpx.post(f"{url}/v1/completions", json={"prompt": "a"}), 503)
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_shutdown_lets_running_requests_finish_then_stops_the_engine(micro, live_server):
    model, tok = load(micro[2], device="cpu")  # its own copy: the hook slows it
    model.norm.register_forward_hook(lambda *_: time.sleep(0.03))
    app = create_app((model, tok), "micro", max_batch=1, max_tokens=64)
    lines = []

    def stream(url):
        with _long_stream(url) as resp:
            lines.extend(line for line in resp.iter_lines() if line)

    with live_server(app) as url:
        client = threading.Thread(target=stream, args=(url,))
        client.start()
        engine = app.state.server.engine
        _wait_until(lambda: engine.active() == 1, 2.0, "the request was not admitted")
    # leaving the block stopped the server (as Ctrl-C does) while the request was running
    client.join(10)
    assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]
    assert not engine.is_alive()


def test_web_page_is_served(server):
    url, _ = server
    if not (REPO / "lmforge/serve/static/index.html").is_file():
        pytest.skip("the web page is not in this checkout")
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert httpx.get(f"{url}/static/app.js").status_code == 200


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_and_shuts_down_on_sigint(micro):
    model_dir = micro[2]
    port = _free_port()
    cmd = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*cmd, "--model-name", "m", "--max-tokens", "8", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        r = _client(url).chat.completions.create(model="m", messages=HELLO)
        assert r.usage.completion_tokens <= 8  # --max-tokens is the default and the limit
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out  # a graceful stop
    assert f"{r.id} prompt=" in out  # the request's log line


def test_cli_reports_a_bad_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cmd = [sys.executable, "-m", "lmforge", "serve", str(tmp_path), "--port", str(_free_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "failed to load" in proc.stderr, proc.stderr


def test_serves_a_quantized_checkpoint(micro, live_server, tmp_path):
    """`lmforge quantize` output, opened by path like any model directory: the openai client
    gets the engine's own greedy answer from the int8 model."""
    from lmforge.compress.quantize import quantize_model
    from lmforge.config import QuantizeConfig
    from lmforge.model.checkpoint import save_quantized
    from lmforge.model.quant import QuantLinear

    model, tok, model_dir = micro
    qmodel, _ = load(model_dir, device="cpu")
    spec = quantize_model(qmodel, QuantizeConfig(method="int8"))
    save_quantized(qmodel, spec, tmp_path / "int8", model_dir, tok.pad_id)
    app = create_app(str(tmp_path / "int8"), "micro-int8", max_batch=4, max_tokens=64)
    with live_server(app) as url:
        r = _client(url).chat.completions.create(
            model="micro-int8", messages=HELLO, max_tokens=12, temperature=0
        )
    served, _ = load(tmp_path / "int8", device="cpu")
    assert isinstance(served.lm_head, QuantLinear)
    want = _alone((served, tok, None), chat_prompt_ids(tok, HELLO), 12, stop_ids(tok))
    assert r.choices[0].message.content == want.text and want.output_ids
