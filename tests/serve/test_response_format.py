"""`response_format` over HTTP with the official openai client: json_schema replies of the
micro model parse and validate (streamed or not), json_object replies are JSON objects, and a
schema the grammar compiler refuses is a 400 naming the field."""

import json

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance", reason="constrained decoding needs the grammar extra")
pytest.importorskip("jsonschema", reason="replies are validated with jsonschema")

from lmforge.infer.constrain import check_json  # noqa: E402

HELLO = [{"role": "user", "content": "Give me a record."}]
SCHEMA = {  # made up: small enough for the micro model's 64-token context
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "tag": {"enum": ["x", "y"]},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}
FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "record", "schema": SCHEMA, "strict": True},
}


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def test_json_schema_reply_parses_and_validates(server):
    url, _ = server
    for seed in range(3):
        r = _client(url).chat.completions.create(
            model="micro", messages=HELLO, response_format=FORMAT, temperature=1.0, seed=seed
        )
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        assert check_json(text, SCHEMA) is None, text


def test_json_schema_streamed(server):
    url, _ = server
    stream = _client(url).chat.completions.create(
        model="micro", messages=HELLO, response_format=FORMAT, stream=True, temperature=0
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert check_json(text, SCHEMA) is None, text


def test_json_object_reply_is_an_object_while_it_fits(server):
    """json_object: the reply is a JSON object, or (cut by the 64-token context) a prefix of
    one; either way it starts as one."""
    url, _ = server
    r = _client(url).chat.completions.create(
        model="micro", messages=HELLO, response_format={"type": "json_object"}, temperature=0
    )
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "fmt, param",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "objekt"}}},
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema"}, "response_format"),
        ({"type": "xml"}, "response_format"),
        (
            {"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}},
            "response_format",
        ),
    ],
)
def test_bad_response_format_is_a_400_naming_it(server, fmt, param):
    url, _ = server
    body = {"model": "micro", "messages": HELLO, "response_format": fmt}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
