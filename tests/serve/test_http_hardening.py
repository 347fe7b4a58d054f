"""The HTTP surface of `lmforge serve` under hostile or careless clients (issue 17): only JSON
bodies are parsed, the Host header is checked (DNS rebinding), deep nesting and lone surrogates
are 400s, a looping chat template costs only its own request, slow and half-sent requests are
dropped with one log line each, the API key stays out of argv and /v1/models, and OpenAI fields
that would change the answer are refused rather than ignored."""

import asyncio
import copy
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from lmforge.commands import resolve_api_key  # noqa: E402
from lmforge.config import ConfigError  # noqa: E402
from lmforge.serve import guards  # noqa: E402
from lmforge.serve.app import create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "Name a color."}]
JSON = {"Content-Type": "application/json"}


def _chat(**overrides):
    return {"model": "micro", "messages": HELLO, "max_tokens": 2, **overrides}


def _post(url, body, path="/v1/chat/completions", headers=JSON, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=30, **kw)


def _error(resp, status, code=None, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    return err


def _wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# --------------------------------------------------------------------------- 2: web pages


def test_only_application_json_bodies_are_parsed(server):
    url, _ = server
    body = json.dumps(_chat()).encode()
    # what a cross-site page can send without a CORS preflight
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        err = _error(_post(url, body, headers={"Content-Type": ctype}), 415)
        assert "Content-Type" in err["message"] and ctype in err["message"]
    _error(_post(url, body, headers={}, path="/v1/completions"), 415)  # none at all
    ok = _post(url, body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_the_web_page_posts_json():
    app_js = REPO / "lmforge/serve/static/app.js"
    if not app_js.is_file():
        pytest.skip("the web page is not in this checkout")
    assert '"Content-Type": "application/json"' in app_js.read_text()


def test_host_header_must_name_this_server(server):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]"):
        for resp in (
            httpx.get(f"{url}/v1/models", headers={"Host": host}),
            httpx.get(f"{url}/", headers={"Host": host}),
            _post(url, _chat(), headers={**JSON, "Host": host}),
        ):
            err = _error(resp, 400, "invalid_host")
            assert host in err["message"] and "--allowed-hosts" in err["message"]
    for host in (f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts():
    loopback = set(guards.LOOPBACK_NAMES)
    assert guards.allowed_hosts("127.0.0.1", None) == loopback
    assert guards.allowed_hosts("localhost", None) == loopback
    assert guards.allowed_hosts("::1", None) == loopback
    assert guards.allowed_hosts("0.0.0.0", None) is None  # reached by names we cannot know
    assert guards.allowed_hosts("127.0.0.1", ["*"]) is None
    assert guards.allowed_hosts("127.0.0.1", ["My.Box", " "]) == {"my.box", "127.0.0.1"}
    assert guards.allowed_hosts("0.0.0.0", ["my.box"]) == {"my.box"}
    assert guards.host_name("[::1]:8000") == "::1" and guards.host_name("a.b:1") == "a.b"


def test_allowed_hosts_option(micro, live_server):
    model, tok, _ = micro
    app = create_app((model, tok), "micro", max_batch=1, allowed_hosts=["my.box"])
    with live_server(app) as url:
        assert httpx.get(f"{url}/v1/models", headers={"Host": "my.box:80"}).status_code == 200
        _error(httpx.get(f"{url}/v1/models", headers={"Host": "localhost"}), 400, "invalid_host")
    app = create_app((model, tok), "micro", max_batch=1, allowed_hosts=["*"])
    with live_server(app) as url:
        assert httpx.get(f"{url}/v1/models", headers={"Host": "any.name"}).status_code == 200


def test_serving_on_all_interfaces_without_a_key_warns(micro, caplog, monkeypatch):
    from lmforge.serve import app as app_module

    model, tok, _ = micro
    started = []
    monkeypatch.setattr(app_module.uvicorn.Server, "run", lambda self: started.append(self))
    caplog.set_level(logging.WARNING, logger="lmforge.serve")
    app = create_app((model, tok), "micro")
    app_module.serve(app, "0.0.0.0", 0)  # run() is stubbed
    assert started and "without an API key" in caplog.text
    assert app.state.server.allowed_hosts is None  # reached by names we cannot know
    caplog.clear()
    app_module.serve(create_app((model, tok), "micro", api_key="k"), "0.0.0.0", 0)
    app_module.serve(create_app((model, tok), "micro"), "127.0.0.1", 0)
    assert "without an API key" not in caplog.text


# --------------------------------------------------------------------------- 4: 500s


def test_deeply_nested_json_is_a_400(server):
    url, _ = server
    for depth in (40, 5000):  # 5000: past the parser's own recursion limit
        inner = "[" * depth + "]" * depth
        body = f'{{"model": "micro", "messages": {inner}}}'.encode()
        err = _error(_post(url, body), 400, "invalid_json")
        assert "nested" in err["message"]
    assert _post(url, _chat()).status_code == 200


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "messages",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
            "messages",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"]}',
            "stop",
        ),  # fmt: skip
        ("/v1/completions", '{"prompt": "x\\udc00"}', "prompt"),
        ("/v1/completions", '{"prompt": ["\\ud800"]}', "prompt"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(server, path, body, param):
    url, _ = server
    err = _error(_post(url, body.encode(), path=path), 400, param=param)
    assert "surrogate" in err["message"] and err["message"].startswith(param)
    assert _post(url, _chat()).status_code == 200


# --------------------------------------------------------------------------- 5: chat templates

# made up for this test: 10^10 empty iterations (the sandbox caps one range at 100,000)
LOOPING_TEMPLATE = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
)


def test_a_looping_chat_template_fails_its_request_only(micro, live_server, caplog):
    model, tok, _ = micro
    looping = copy.copy(tok)
    looping.chat_template = LOOPING_TEMPLATE
    app = create_app((model, looping), "micro", max_batch=1, template_timeout=0.5)
    srv = app.state.server
    caplog.set_level(logging.ERROR, logger="lmforge.serve")
    with live_server(app) as url:
        for _ in range(3):  # more than the 2 render slots: each stuck render was stopped
            err = _error(_post(url, _chat()), 500, "template_timeout")
            assert "0.5 s" in err["message"]
        r = _post(url, {"prompt": "The", "max_tokens": 2}, path="/v1/completions")
        assert r.status_code == 200, r.text
        _wait_until(lambda: srv.render.busy == 0, 10, "a render thread is still running")
    with pytest.raises(httpx.TransportError):  # the server has stopped
        httpx.get(f"{url}/health", timeout=5)
    assert not [t for t in threading.enumerate() if t.name == "render"]
    assert caplog.text.count("the chat template took over 0.5 s") == 3


def test_a_burst_of_renders_waits_for_a_free_slot():
    """Six quick renders through two slots at once: the later ones wait their turn (this was a
    503 for the third concurrent client)."""

    async def main():
        render = guards.TemplateRenderer(slots=2, timeout=5)
        got = await asyncio.gather(*[render(lambda i=i: time.sleep(0.05) or i) for i in range(6)])
        assert got == list(range(6)) and render.busy == 0

    asyncio.run(main())


def test_a_render_that_cannot_be_stopped_keeps_its_slot_and_later_ones_get_busy():
    release = threading.Event()

    async def main():
        render = guards.TemplateRenderer(slots=1, timeout=0.2, wait=0.3)
        with pytest.raises(guards.RenderTimeout):
            await render(lambda: release.wait(10))  # blocked in C: the kill waits for it
        assert render.busy == 1
        with pytest.raises(guards.RenderBusy):
            await render(lambda: 1)
        release.set()
        deadline = time.monotonic() + 10
        while render.busy:
            assert time.monotonic() < deadline, "the stopped render did not give its slot back"
            await asyncio.sleep(0.01)
        assert await render(lambda: 42) == 42

    asyncio.run(main())


# --------------------------------------------------------------------------- 6: slow clients


def _recv_all(sock) -> bytes:
    """Everything until the server closes the connection (the socket's timeout bounds it); a
    reset reads as b"RESET" (a refused connection is closed before its request is read)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        return out or b"RESET"
    return out


def test_slow_and_half_sent_requests_are_dropped_with_one_line_each(micro, live_server, caplog):
    from lmforge.serve.guards import guarded_http_protocol

    model, tok, _ = micro
    # 2 s: the 6 held connections must still be open when the last 4 arrive, after a normal
    # request has been answered (slow on a loaded machine)
    app = create_app((model, tok), "micro", max_batch=1, request_timeout=2.0)
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate
    uvicorn_log.addHandler(caplog.handler)
    http = guarded_http_protocol(max_connections=8, timeout=2.0)
    socks = []
    try:
        with live_server(app, http=http) as url:
            port = int(url.rsplit(":", 1)[1])

            def connect(data: bytes):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(data)
                socks.append(s)
                return s

            for _ in range(5):  # headers that never end
                connect(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            body_head = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model"'
            )
            connect(body_head)  # a body that never ends
            ok = httpx.post(f"{url}/v1/chat/completions", json=_chat(), timeout=30)
            assert ok.status_code == 200, ok.text  # answered meanwhile
            for _ in range(4):  # past the limit of 8: some of these are refused at once
                connect(b"GET /health HTTP/1.1\r\n")
            answers = [_recv_all(s) for s in socks]  # the server closes every one
        assert answers[5].startswith(b"HTTP/1.1 408") and b"request_timeout" in answers[5]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers[:5])
        refused = [a for a in answers[6:] if not a.startswith(b"HTTP/1.1 408")]
        assert refused and all(a.startswith((b"HTTP/1.1 503", b"RESET")) for a in refused)
        for s in socks:  # one log line per connection, naming it
            name = f"127.0.0.1:{s.getsockname()[1]} "
            assert len([m for m in caplog.messages if name in m]) == 1, (name, caplog.messages)
        assert sum(" refused: " in m for m in caplog.messages) == len(refused)
        assert not [r for r in caplog.records if r.exc_info] and "Traceback" not in caplog.text
    finally:
        uvicorn_log.removeHandler(caplog.handler)
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- 7: the API key


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert resolve_api_key(None, str(key_file), {}) == ("s3cret", f"--api-key-file {key_file}")
    assert resolve_api_key(None, None, {"LMFORGE_API_KEY": "e"}) == ("e", "$LMFORGE_API_KEY")
    assert resolve_api_key("k", None, {"LMFORGE_API_KEY": "e"}) == ("k", "--api-key")
    assert resolve_api_key(None, None, {}) == (None, "")
    (tmp_path / "empty").write_text("\n")
    for path, words in ((tmp_path / "empty", "empty"), (tmp_path / "missing", "cannot read")):
        with pytest.raises(ConfigError, match=words) as e:
            resolve_api_key(None, str(path), {})
        assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match="not both"):
        resolve_api_key("k", str(key_file), {})


def test_cli_serve_options_and_the_argv_key_warning(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lmforge", "serve"]
    helptext = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env).stdout
    for option in ("--api-key-file", "--served-model-name", "--allowed-hosts"):
        assert option in helptext
    for option in ("--max-connections", "--request-timeout"):
        assert option in helptext
    # a directory that is not a model: the command stops before binding a port
    proc = subprocess.run(
        [*cmd, str(tmp_path / "nothing"), "--api-key", "s3cret"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "--api-key is visible" in proc.stderr, proc.stderr
    proc = subprocess.run(
        [*cmd, str(tmp_path), "--api-key-file", str(tmp_path / "missing")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "--api-key-file" in proc.stderr, proc.stderr


def test_models_show_the_served_name_not_the_path(micro, live_server):
    model_dir = micro[2]
    app = create_app(str(model_dir), max_batch=1, max_tokens=8, device="cpu")
    with live_server(app) as url:
        listing = httpx.get(f"{url}/v1/models")
        assert [m["id"] for m in listing.json()["data"]] == [Path(model_dir).name]
        assert str(Path(model_dir).parent) not in listing.text
        for name in (Path(model_dir).name, str(model_dir)):  # the path still works
            r = _post(url, _chat(model=name))
            assert r.status_code == 200 and str(model_dir) not in r.text, r.text
        err = _error(_post(url, _chat(model="other")), 404, "model_not_found")
        assert str(Path(model_dir).parent) not in err["message"]


# --------------------------------------------------------------------------- 8: ignored fields


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/chat/completions", "logit_bias", {"50": 100}),
        ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
        ("/v1/chat/completions", "function_call", {"name": "f"}),
        ("/v1/chat/completions", "modalities", ["text", "audio"]),
        ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
        ("/v1/chat/completions", "web_search_options", {}),
        ("/v1/chat/completions", "reasoning_effort", "low"),
        ("/v1/chat/completions", "verbosity", "high"),
        ("/v1/completions", "logit_bias", {"50": -100}),
    ],
)
def test_fields_that_would_change_the_answer_are_refused(server, path, field, value):
    url, _ = server
    body = {**_chat(), field: value}
    if path == "/v1/completions":
        body = {"prompt": "The", "max_tokens": 2, field: value}
    err = _error(_post(url, body, path=path), 400, "unsupported_parameter", param=field)
    assert err["message"].startswith(f"{field}=")


def test_defaults_metadata_and_unknown_extras_are_accepted(server):
    url, _ = server
    harmless = {
        "response_format": {"type": "text"},
        "logit_bias": {},
        "tool_choice": "none",
        "function_call": "auto",
        "modalities": ["text"],
        "verbosity": "medium",
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "prediction": {"type": "content", "content": "x"},
        "reasoning_effort": None,
        "min_p": 0.1,  # another server's extra
    }
    r = _post(url, {**_chat(), **harmless})
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="micro", prompt="a", logit_bias={"5": 1})
