"""The `confidence` extension of /v1/chat/completions over HTTP, on the micro model."""

import json
import math

import httpx
import pytest

HELLO = [{"role": "user", "content": "Once upon a time"}]


def _post(url, **body):
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, **body}, timeout=60)


def test_logprob_confidence_is_the_mean_of_the_token_logprobs(server):
    url, _ = server
    r = _post(url, max_tokens=8, temperature=0, logprobs=True, confidence="logprob")
    assert r.status_code == 200, r.text
    body = r.json()
    lps = [t["logprob"] for t in body["choices"][0]["logprobs"]["content"]]
    conf = body["confidence"]
    assert conf["method"] == "logprob" and conf["tokens"] == len(lps) > 0
    assert conf["mean_logprob"] == pytest.approx(sum(lps) / len(lps))
    assert conf["score"] == pytest.approx(math.exp(sum(lps) / len(lps)))
    # without logprobs asked for, they stay out of the response; the confidence is the same
    r = _post(url, max_tokens=8, temperature=0, confidence="logprob").json()
    assert r["choices"][0]["logprobs"] is None
    assert r["confidence"]["score"] == pytest.approx(conf["score"], rel=1e-4)
    assert "confidence" not in _post(url, max_tokens=4, temperature=0).json()


def test_logprob_confidence_streams_on_the_finish_chunk(server):
    url, _ = server
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "stream": True,
            "confidence": "logprob"}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)
    finish = chunks[-1]
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert finish["confidence"]["method"] == "logprob" and 0 < finish["confidence"]["score"] <= 1


def test_self_consistency_confidence(server):
    url, app = server
    args = dict(max_tokens=6, temperature=0, seed=7, confidence="self_consistency")
    r = _post(url, **args, confidence_samples=3)
    assert r.status_code == 200, r.text
    conf = r.json()["confidence"]
    assert conf["method"] == "self_consistency" and conf["samples"] == 3
    assert conf["score"] == pytest.approx(conf["agreeing"] / 3)
    # seeded samples: the same score again
    assert _post(url, **args, confidence_samples=3).json()["confidence"] == conf
    assert app.state.server.engine.active() == 0  # no sample left running


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"confidence": "vibes"}, "confidence"),
        ({"confidence": "self_consistency", "confidence_samples": 0}, "confidence_samples"),
        ({"confidence": "self_consistency", "confidence_samples": 99}, "confidence_samples"),
        ({"confidence": "self_consistency", "stream": True}, "confidence"),
    ],
)
def test_bad_confidence_requests(server, extra, param):
    url, _ = server
    r = _post(url, max_tokens=4, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
