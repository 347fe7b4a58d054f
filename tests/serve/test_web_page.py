"""The chat page `lmforge serve` shows at `/`, driven in headless Chromium against the real
server and the micro model: streamed answers, multi-turn history, Stop, and server errors.

The servers run in this process (tests/serve/conftest.py's `live_server`). Every assertion
about text compares the page with what the server sent (the SSE body the
browser received, or the error the same request gets without a browser), not with pinned
strings, so retraining the micro model changes nothing here.
"""

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright (the `test` extra)"
)
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
    ),
]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "test-key-123"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def web_server(micro_pretrained, live_server):
    """The real app over the micro model (64 tokens of context), with the default limits."""
    from lmforge.serve.app import create_app

    with live_server(create_app(micro_pretrained[1], "micro")) as url:
        yield url


@pytest.fixture(scope="module")
def key_server(micro_pretrained, live_server):
    from lmforge.serve.app import create_app

    with live_server(create_app(micro_pretrained[1], "micro", api_key=API_KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 720},
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


def _open(page, base):
    """Load the page and wait until it has fetched the model list."""
    page.goto(base + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def _settings(page, temperature="0", max_tokens="12", seed="0"):
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#seed", seed)


def _send(page, text):
    """Type a message, send it, and return (request JSON, SSE body text) once the answer ended."""
    page.fill("#message", text)
    with page.expect_response("**/v1/chat/completions") as resp:
        page.click("#send")
    response = resp.value
    assert response.ok, response.text()
    assert "text/event-stream" in response.headers["content-type"]
    page.wait_for_selector(".msg.assistant:last-child[data-state=done]")
    return response.request.post_data_json, response.text()


def _streamed_text(sse: str) -> tuple[str, str | None]:
    """(answer, finish_reason) from an SSE body."""
    pieces, finish = [], None
    lines = [ln[len("data: ") :] for ln in sse.splitlines() if ln.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", sse[-200:]
    for line in lines[:-1]:
        choice = json.loads(line)["choices"][0]
        if choice["delta"].get("content"):
            pieces.append(choice["delta"]["content"])
        finish = choice.get("finish_reason") or finish
    return "".join(pieces), finish


def _bubbles(page):
    return page.eval_on_selector_all(
        "#messages .msg",
        "els => els.map(e => [e.classList[1], e.querySelector('.content').textContent])",
    )


def _server_error(base, body, key=None) -> str:
    """The `error.message` the server answers this request with, fetched without a browser."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), headers, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    return json.loads(err.value.read())["error"]["message"]


def test_streamed_multi_turn_chat(page, web_server):
    urls = []
    page.on("request", lambda r: urls.append(r.url))
    _open(page, web_server)
    # every input is labelled, and nothing is fetched from anywhere but the server
    unlabelled = page.eval_on_selector_all(
        "input, textarea, select", "els => els.filter(e => !e.labels.length).map(e => e.id)"
    )
    assert unlabelled == []
    assert page.is_enabled("#send") and page.is_disabled("#stop")

    # the micro model has 64 tokens of context: short turns, so that two of them fit
    _settings(page, temperature="1", max_tokens="4", seed="0")
    page.fill("#system", "Be brief.")
    request, sse = _send(page, "Hi")
    answer, finish = _streamed_text(sse)
    assert request["stream"] is True and request["max_tokens"] == 4 and request["seed"] == 0
    assert request["temperature"] == 1 and request["top_p"] == 1
    assert request["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert answer and finish in ("stop", "length")
    assert _bubbles(page) == [["user", "Hi"], ["assistant", answer]]
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    assert page.input_value("#message") == ""
    page.screenshot(path="/tmp/lmforge_page.png")

    # the second turn sends the whole conversation; Enter sends
    page.fill("#message", "More?")
    with page.expect_request("**/v1/chat/completions") as req:
        page.press("#message", "Enter")
    page.wait_for_selector(".msg.assistant:nth-child(4)[data-state=done]")
    assert req.value.post_data_json["messages"][1:] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "More?"},
    ]
    assert len(_bubbles(page)) == 4
    assert all(u.startswith(web_server) for u in urls), urls

    # Shift+Enter is a newline, not a send; "New chat" forgets the conversation
    page.fill("#message", "first line")
    page.press("#message", "Shift+Enter")
    page.type("#message", "second line")
    assert page.input_value("#message") == "first line\nsecond line"
    assert len(_bubbles(page)) == 4
    page.click("#new-chat")
    assert _bubbles(page) == []
    page.fill("#system", "")
    request, _ = _send(page, "Hello")
    assert request["messages"] == [{"role": "user", "content": "Hello"}]


def test_stop_keeps_partial_answer(page, web_server):
    _open(page, web_server)
    # slow the stream down in the browser so Stop lands mid-answer however fast the model is:
    # at 2 kB/s, the ~10 kB of events of a full micro answer take ~4 s and come in ~1.5 kB bursts
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": 2000, "uploadThroughput": -1},
    )
    _settings(page, temperature="1", max_tokens="200", seed="1")
    page.fill("#message", "Tell me a long story.")
    page.click("#send")
    assert page.is_disabled("#send") and page.is_enabled("#stop")
    # tokens show while the answer is still streaming
    page.wait_for_function(
        "document.querySelector('.msg.assistant .content').textContent.length > 0"
    )
    assert page.get_attribute(".msg.assistant", "data-state") == "streaming"
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]")
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    partial = page.text_content(".msg.assistant .content")
    assert partial
    page.wait_for_timeout(1000)  # nothing more arrives after Stop
    assert page.text_content(".msg.assistant .content") == partial
    assert page.is_hidden("#error")

    # the partial answer is part of the conversation the next turn sends
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    _settings(page, max_tokens="4")
    request, _ = _send(page, "Go on.")
    assert request["messages"] == [
        {"role": "user", "content": "Tell me a long story."},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "Go on."},
    ]


def test_bad_request_shows_server_message(page, web_server):
    _open(page, web_server)
    _settings(page, max_tokens="-1")
    page.fill("#message", "Hi")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    expected = _server_error(
        web_server, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -1}
    )
    assert expected in page.text_content("#error") and "400" in page.text_content("#error")
    # the refused turn is taken back: the text returns to the input, ready to resend
    assert _bubbles(page) == []
    assert page.input_value("#message") == "Hi"
    assert page.is_enabled("#send") and page.is_disabled("#stop")

    _settings(page, max_tokens="4")
    request, _ = _send(page, "Hi")
    assert request["messages"] == [{"role": "user", "content": "Hi"}]
    assert page.is_hidden("#error")


def test_api_key(page, key_server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    page.goto(key_server + "/")
    _settings(page, max_tokens="4")
    page.fill("#message", "Hi")
    for key in ("", "wrong-key"):
        page.fill("#api-key", key)
        with page.expect_response("**/v1/chat/completions") as resp:
            page.press("#message", "Enter")
        assert resp.value.status == 401
        page.wait_for_selector("#send:enabled")
        expected = _server_error(key_server, body, key=key)
        assert expected in page.text_content("#error") and "401" in page.text_content("#error")
        assert _bubbles(page) == [] and page.input_value("#message") == "Hi"
    assert _server_error(key_server, body) != _server_error(key_server, body, key="wrong-key")

    page.fill("#api-key", API_KEY)
    with page.expect_request("**/v1/chat/completions") as req:
        page.press("#message", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    assert req.value.headers["authorization"] == f"Bearer {API_KEY}"
    assert page.is_hidden("#error")
    assert page.text_content(".msg.assistant .content")


def test_network_error_is_shown(page, web_server):
    _open(page, web_server)
    page.route("**/v1/chat/completions", lambda route: route.abort())
    page.fill("#message", "Hi")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "Network error" in page.text_content("#error")
    assert page.is_enabled("#send") and page.is_disabled("#stop")


def test_the_page_chats_with_the_real_smollm2(page, smollm2_dir, live_server):
    """The page on the imported SmolLM2-135M-Instruct: its own template and <|im_end|> end
    the turn, and the bubble shows what the server streamed, greedy."""
    from lmforge.serve.app import create_app

    with live_server(create_app(smollm2_dir, max_batch=1, max_tokens=64)) as url:
        _open(page, url)
        assert page.eval_on_selector("#model", "s => s.value") == smollm2_dir.name
        _settings(page, temperature="0", max_tokens="64")
        request, sse = _send(page, "What is the capital of France?")
        answer, finish = _streamed_text(sse)
        assert answer == "The capital of France is Paris." and finish == "stop"
        assert _bubbles(page) == [
            ["user", "What is the capital of France?"],
            ["assistant", answer],
        ]
