"""Hostile sampling parameters against a live server: every value outside the API's ranges is a
400 naming its field, values inside them however extreme just work, and a request that fails
inside the engine ends alone (an error answer, or an SSE error event) while the server goes on
answering. Before, top_p=1e-46 or repetition_penalty=1e-39 killed the engine thread for good."""

import json
import math

import httpx
import pytest

pytest.importorskip("fastapi")

from lmforge.model.load import load  # noqa: E402
from lmforge.serve.app import create_app  # noqa: E402
from lmforge.serve.protocol import MAX_STOP_CHARS  # noqa: E402

HELLO = [{"role": "user", "content": "Name a color."}]

BAD = [  # (field, value): each is outside the API's range (or not a number at all)
    *[("top_p", v) for v in (0, -1, 1.5, "nan", "0.5", math.nan, math.inf)],
    *[("repetition_penalty", v) for v in (1e-39, 0, -1, 1e30, 101, math.nan, -math.inf)],
    *[("temperature", v) for v in (-1, 3, 2.0001, math.nan, math.inf, "1")],
    *[("top_k", v) for v in (-5, -2, 1.5, "3")],
    *[("max_tokens", v) for v in (0, -1, 10**6)],
    *[("seed", v) for v in (-1, 2**64, 1.5)],
    *[("presence_penalty", v) for v in (3, math.nan)],
    *[("frequency_penalty", v) for v in (-3, math.inf)],
    ("stop", ["a", "b", "c", "d", "e"]),  # more than OpenAI's 4
    ("stop", "x" * (MAX_STOP_CHARS + 1)),  # one long stop string (was O(len^2) per token)
    ("stop", ["ok", "y" * 1_000]),
]


@pytest.fixture(scope="module")
def hostile_server(micro, live_server):
    """Its own server over a fresh copy of the micro model: 2 slots, max_tokens up to 16."""
    model, tok = load(micro[2], device="cpu")
    app = create_app((model, tok), "micro", max_batch=2, max_tokens=16)
    with live_server(app) as url:
        yield url


def _post(url: str, path: str, body: dict) -> httpx.Response:
    """json.dumps writes NaN and Infinity as bare words, which the server's JSON parser reads."""
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{url}{path}", content=json.dumps(body), headers=headers, timeout=30)


def _bodies(**sampling):
    chat = {"model": "micro", "messages": HELLO, "max_tokens": 4, **sampling}
    text = {"model": "micro", "prompt": "Once upon a time", "max_tokens": 4, **sampling}
    return [("/v1/chat/completions", chat), ("/v1/completions", text)]


def _still_serving(url: str) -> None:
    health = httpx.get(f"{url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    for path, body in _bodies(temperature=0):
        resp = _post(url, path, body)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1


def test_every_bad_value_is_a_400_naming_its_field(hostile_server):
    url = hostile_server
    wrong = []
    for field, value in BAD:
        for path, body in _bodies(**{"temperature": 1.0, field: value}):
            resp = _post(url, path, body)
            err = resp.json().get("error") or {}
            if resp.status_code != 400 or err.get("param") != field or field not in err["message"]:
                wrong.append((path, field, value, resp.status_code, resp.text[:200]))
    assert not wrong, wrong
    _still_serving(url)


@pytest.mark.parametrize(
    "sampling",
    [
        dict(top_p=1e-46),  # below float32's smallest number: 0 there, used to drop every token
        dict(top_p=1e-45),
        dict(top_p=5e-324, top_k=1),
        dict(temperature=1e-30),  # below SAMPLING_EPS: greedy
        dict(temperature=2, repetition_penalty=0.01),  # the range's edges
        dict(temperature=2, repetition_penalty=100, top_k=10**9),
        dict(stop=["", "z" * MAX_STOP_CHARS]),  # "" is ignored
        dict(seed=2**63 - 1, max_tokens=16),
    ],
)
def test_extreme_values_inside_the_ranges_just_work(hostile_server, sampling):
    url = hostile_server
    for path, body in _bodies(**{"temperature": 1.0, **sampling}):
        resp = _post(url, path, body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["finish_reason"] in ("length", "stop")
    _still_serving(url)


def test_a_request_failing_in_the_engine_ends_alone(hostile_server, monkeypatch):
    """An injected bug hits only requests with top_k=7: that one gets a 500 (streamed: an SSE
    error event), the engine thread lives on and the next request answers."""
    import lmforge.infer.engine as engine_mod

    real = engine_mod.sample_next

    def sample(logits, temperature, top_k, top_p, gen):
        if top_k == 7:
            raise RuntimeError("injected sampling failure")
        return real(logits, temperature, top_k, top_p, gen)

    monkeypatch.setattr(engine_mod, "sample_next", sample)
    url = hostile_server
    for path, body in _bodies(top_k=7):
        resp = _post(url, path, body)
        assert resp.status_code == 500, resp.text
        assert "injected sampling failure" in resp.json()["error"]["message"]
        with httpx.stream(
            "POST", f"{url}{path}", json={**body, "stream": True}, timeout=30
        ) as streamed:
            lines = [line for line in streamed.iter_lines() if line]
        assert streamed.status_code == 200 and lines[-1] == "data: [DONE]"
        assert "injected sampling failure" in json.loads(lines[-2][6:])["error"]["message"]
    _still_serving(url)
