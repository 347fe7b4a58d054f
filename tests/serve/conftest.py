"""Live servers for the serving tests: uvicorn in a thread on a free port of 127.0.0.1, one per
test module, over the session's micro model."""

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


def load_micro(model_dir):
    """A fresh (model, tokenizer): each server gets its own model object, so one test's forward
    hook never slows another server down."""
    from lmforge.model.load import load

    return load(model_dir, device="cpu")


def _health(url: str) -> int | None:
    """/health's status, or None when it did not answer in time (the loop is busy loading)."""
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code
    except httpx.TimeoutException:
        return None


@contextmanager
def _live_server(app, wait_ready: bool = True, **config):
    """Serve `app` on a free port; yields the base URL. Stopping it runs the app's shutdown.
    `config`: more uvicorn.Config arguments (http=guarded_http_protocol(...))."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, **config)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        deadline = time.monotonic() + 120  # a real model loads slowly on a busy machine
        while wait_ready and _health(url) != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="session")
def live_server():
    """`with live_server(app, wait_ready=True, **uvicorn_config) as url:` serves an app of a
    test's own."""
    return _live_server


@pytest.fixture(scope="module")
def micro(micro_pretrained):
    """(model, tokenizer, model_dir) of the session's micro model (64 tokens of context)."""
    model_dir = micro_pretrained[1]
    return (*load_micro(model_dir), model_dir)


@pytest.fixture(scope="module")
def server(micro):
    """The main server: 4 slots, a 64-token max_tokens limit and a 16 kB body limit."""
    from lmforge.serve.app import create_app

    model, tok, _ = micro
    app = create_app(
        (model, tok), "micro", max_batch=4, max_queue=64, max_tokens=64, max_request_bytes=16_000
    )
    with _live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def slow_server(micro):
    """One slot, no queue, and a model slowed to ~40 ms a token, so that a long request is
    still running while the test acts (disconnects, sends another)."""
    from lmforge.serve.app import create_app

    model, tok = load_micro(micro[2])
    model.norm.register_forward_hook(lambda *_: time.sleep(0.04))  # once per step
    app = create_app((model, tok), "micro", max_batch=1, max_queue=0, max_tokens=64)
    with _live_server(app) as url:
        yield url, app


@pytest.fixture
def script_answer(monkeypatch):
    """`script_answer(pieces)` replaces what the engine streams with `pieces` (made up by the
    calling test), after the real request has run out, so that the server's handling of a
    known answer is tested."""
    from lmforge.serve import responses

    real = responses.request_events

    def apply(pieces: list[str]) -> None:
        async def events(http, req, inbox):
            last = (True, 0)
            async for _, done, n in real(http, req, inbox):  # the engine's request runs out
                last = (done, n)
            for i, piece in enumerate(pieces):
                yield piece, last[0] and i == len(pieces) - 1, last[1]

        monkeypatch.setattr(responses, "request_events", events)

    return apply
