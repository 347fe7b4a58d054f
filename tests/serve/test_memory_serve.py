"""`lmforge serve --memory`: a chat request longer than the context is fitted by the memory
strategy instead of refused, and the x-lmforge-memory header says what became of the turns.
Over HTTP against the micro model."""

import json

import httpx
import pytest

from lmforge.config import ConfigError

# a made-up conversation longer than 512 tokens of the micro tokenizer: a fact, then small talk
FACT = "My locker code is zebra42."
TALK = ["How do I boil an egg?", "Why is the sea salty?", "What is a good snack?",
        "How do I water a cactus?", "What makes bread rise?", "Any tips for sleep?",
        "How do bees make honey?", "Why do leaves fall in autumn?"]  # fmt: skip
MESSAGES = [{"role": "system", "content": "Be brief."}]
for q in [FACT, *TALK]:
    MESSAGES += [{"role": "user", "content": q}, {"role": "assistant", "content": "Sure. " * 8}]
MESSAGES += [{"role": "user", "content": "What is my locker code?"}]
BODY = {"model": "micro", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def micro_512(micro, tmp_path_factory):
    """The micro model with 512 tokens of context instead of 64: the same weights (RoPE has no
    position weights), so a conversation can outgrow a budget yet hold a note. Its answers past
    64 tokens are nonsense, which these tests do not read."""
    from lmforge.model.load import load

    src, out = micro[2], tmp_path_factory.mktemp("micro_512")
    for f in src.iterdir():
        (out / f.name).symlink_to(f)
    (out / "config.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 512}))
    return load(out, device="cpu")


@pytest.fixture(scope="module")
def memory_server(micro_512, live_server):
    """Two servers over the same model: --memory retrieve and --memory summary."""
    from lmforge.serve.app import create_app

    model, tok = micro_512
    urls = {}
    with live_server(create_app((model, tok), "micro", memory="retrieve")) as urls["retrieve"]:
        with live_server(create_app((model, tok), "micro", memory="summary")) as urls["summary"]:
            yield urls


def test_without_memory_a_too_long_conversation_is_refused(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "x-lmforge-memory" not in r.headers


def test_retrieve_fits_the_conversation_and_brings_the_fact_back(memory_server):
    r = httpx.post(f"{memory_server['retrieve']}/v1/chat/completions", json=BODY, timeout=60)
    assert r.status_code == 200, r.text
    head = r.headers["x-lmforge-memory"]
    assert head.startswith("retrieve; dropped=") and head.endswith("retrieved=1"), head
    assert r.json()["usage"]["prompt_tokens"] <= 512 - 4


def test_the_header_comes_with_a_stream_too(memory_server):
    body = {**BODY, "stream": True}
    with httpx.stream(
        "POST", f"{memory_server['retrieve']}/v1/chat/completions", json=body, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["x-lmforge-memory"].startswith("retrieve; dropped=")
        assert r.read().decode().rstrip().endswith("data: [DONE]")


def test_summary_summarises_the_dropped_turns_with_the_model(memory_server):
    r = httpx.post(f"{memory_server['summary']}/v1/chat/completions", json=BODY, timeout=120)
    assert r.status_code == 200, r.text
    head = r.headers["x-lmforge-memory"]
    dropped = int(head.split("dropped=")[1].split(";")[0])
    assert dropped > 0 and head == f"summary; dropped={dropped}; summarised={dropped}"


def test_a_short_conversation_is_untouched(memory_server):
    body = {**BODY, "messages": MESSAGES[:2]}
    r = httpx.post(f"{memory_server['summary']}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and "x-lmforge-memory" not in r.headers


def test_a_bad_memory_value_is_a_clear_error(micro):
    from lmforge.serve.app import create_app

    with pytest.raises(ConfigError, match="memory must be one of drop, summary, retrieve"):
        create_app(micro[:2], "micro", memory="forget")
