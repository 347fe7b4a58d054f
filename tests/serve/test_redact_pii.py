"""`lmforge serve --redact-pii` over real HTTP: the answer, whole and streamed, reaches the client
with its PII replaced, even when an address or number is split across stream pieces; without
the flag the same answer passes unchanged. The micro model writes no PII, so its events are
replaced by a scripted answer after the real request has finished (request_events patched)."""

import pytest

openai = pytest.importorskip("openai")


from lmforge.serve.app import create_app  # noqa: E402

# made up: a reserved example domain and a 555 number, cut mid-address and mid-number
PIECES = ["Mail zhang.san@exa", "mple.com or call +1 415", "-555-0", "132. Bye."]
REDACTED = "Mail <EMAIL> or call <PHONE>. Bye."
HELLO = [{"role": "user", "content": "Name a color."}]


@pytest.fixture
def scripted(script_answer):
    script_answer(PIECES)


def _answers(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    args = dict(model="micro", messages=HELLO, max_tokens=4, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.content
    deltas = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**args, stream=True)
        if c.choices
    ]
    text = client.completions.create(model="micro", prompt="Hi", max_tokens=4, stream=True)
    return whole, deltas, "".join(c.choices[0].text for c in text)


def test_redact_pii_whole_and_streamed(micro, live_server, scripted):
    model, tok, _ = micro
    with live_server(create_app((model, tok), "micro", redact_pii=True)) as url:
        whole, deltas, completion = _answers(url)
        assert whole == REDACTED and "".join(deltas) == REDACTED and completion == REDACTED
        assert not any(s in d for d in deltas for s in ("zhang", "exa", "415", "555", "0132"))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="redact-pii"):
            client.chat.completions.create(model="micro", messages=HELLO, logprobs=True)


def test_without_the_flag_the_answer_is_unchanged(micro, live_server, scripted):
    model, tok, _ = micro
    with live_server(create_app((model, tok), "micro")) as url:
        whole, deltas, completion = _answers(url)
        assert whole == "".join(PIECES) == "".join(deltas) == completion
