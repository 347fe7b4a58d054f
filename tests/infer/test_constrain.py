"""Constrained decoding: on random schemas the micro model's output always parses and
validates, alone (generate) and in a batch with other schemas (the engine); the stop comes
only once the JSON has closed."""

import json
import random

import pytest

pytest.importorskip("llguidance", reason="constrained decoding needs the grammar extra")
pytest.importorskip("jsonschema", reason="outputs are validated with jsonschema")

from lmforge.config import ConfigError  # noqa: E402
from lmforge.infer.constrain import (  # noqa: E402
    Constraint,
    check_json,
    json_grammar,
    tool_call_grammar,
)
from lmforge.infer.engine import Engine, SamplingParams  # noqa: E402
from lmforge.infer.generate import generate, special_ids  # noqa: E402
from lmforge.infer.toolcall import parse_tool_calls  # noqa: E402
from lmforge.model.checkpoint import load_model  # noqa: E402
from lmforge.tokenizer import TOOL_CALL_OPEN, Tokenizer  # noqa: E402


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A made-up object schema, small enough for the micro model's 64-token context: bounded
    strings, integers, enums, booleans, short arrays, one level of nesting."""
    kinds = ["string", "integer", "enum", "boolean", "array"] + (["object"] if depth == 0 else [])
    props = {}
    for k in range(rng.randint(1, 2)):
        kind = rng.choice(kinds)
        if kind == "string":
            props[f"s{k}"] = {"type": "string", "maxLength": 4}
        elif kind == "integer":
            props[f"i{k}"] = {"type": "integer", "minimum": 0, "maximum": 99}
        elif kind == "enum":
            props[f"e{k}"] = {"enum": ["a", "b", "c"]}
        elif kind == "boolean":
            props[f"b{k}"] = {"type": "boolean"}
        elif kind == "array":
            props[f"a{k}"] = {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}
        else:
            props[f"o{k}"] = random_schema(rng, depth + 1)
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


@pytest.fixture(scope="module")
def micro(micro_pretrained):
    model_dir = micro_pretrained[1]
    return load_model(model_dir), Tokenizer.load(model_dir)


def _generate(model, tok, schema, seed, grammar=None, prefill="{"):
    grammar = grammar or json_grammar(schema)
    constraint = Constraint(tok, grammar, model.cfg.vocab_size, tok.stop_ids())
    prompt = [tok.bos_id] + tok.encode(prefill)
    ids = list(
        generate(
            model,
            prompt,
            max_new_tokens=60,
            temperature=1.0,
            seed=seed,
            stop_ids=tok.stop_ids(),
            banned=special_ids(tok, model.cfg.vocab_size),
            constraint=constraint,
        )
    )
    return ids, constraint


def test_random_schemas_always_validate_alone(micro):
    """20 seeded schemas, sampled at temperature 1: every output is valid JSON for its schema,
    and it ends where the JSON closes (no stop token was needed after it)."""
    model, tok = micro
    rng = random.Random(0)
    for n in range(20):
        schema = random_schema(rng)
        ids, constraint = _generate(model, tok, schema, seed=n)
        text = tok.decode(ids)
        assert check_json(text, schema) is None, (schema, text, check_json(text, schema))
        assert constraint.finished and text.endswith("}")


def test_any_json_object(micro):
    """json_object mode: greedy micro-model output parses as a JSON object (or is cut by the
    context, never malformed up to there)."""
    model, tok = micro
    ids, constraint = _generate(model, tok, None, seed=0)
    if constraint.finished:
        assert isinstance(json.loads(tok.decode(ids)), dict)
    else:  # the micro model's 64-token context ended first: the prefix is still on the grammar
        assert not constraint.matcher.is_error()


def test_batched_engine_requests_with_different_schemas(micro):
    """Six requests with six schemas share four slots: each output validates against its own
    schema, finishes with "stop" when its JSON closes, and equals the same request alone
    through generate (greedy)."""
    model, tok = micro
    rng = random.Random(1)
    schemas = [random_schema(rng) for _ in range(6)]
    prompt = [tok.bos_id] + tok.encode("{")
    engine = Engine(model, tok, max_batch=4)
    reqs = [
        engine.submit(
            prompt,
            SamplingParams(max_tokens=60, stop_ids=tok.stop_ids(), grammar=json_grammar(s)),
        )
        for s in schemas
    ]
    engine.run_until_done()
    for schema, req in zip(schemas, reqs):
        assert req.error is None, req.error
        assert req.finish_reason == "stop" and req.stop_token is None
        assert check_json(req.text, schema) is None, (schema, req.text)
        constraint = Constraint(tok, json_grammar(schema), model.cfg.vocab_size, tok.stop_ids())
        alone = generate(
            model,
            prompt,
            max_new_tokens=60,
            stop_ids=tok.stop_ids(),
            banned=special_ids(tok, model.cfg.vocab_size),
            constraint=constraint,
        )
        assert req.output_ids == list(alone)


def test_stop_token_is_allowed_only_after_the_json_closes(micro):
    """While the object is open the stop tokens are masked; once it closes only they remain."""
    model, tok = micro
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    constraint = Constraint(tok, json_grammar(schema), model.cfg.vocab_size, tok.stop_ids())
    stops = list(tok.stop_ids())
    for piece in ['{"k": ', "true"]:
        assert constraint.banned()[0, stops].all()
        for t in tok.encode(piece):
            constraint.advance(t)
    assert constraint.banned()[0, stops].all()  # more properties could still follow
    constraint.advance(tok.encode("}")[0])
    allowed = (~constraint.banned()[0]).nonzero().flatten().tolist()
    assert constraint.finished and set(allowed) <= set(stops)


def test_forced_tool_calls_parse_and_validate(micro):
    """A call forced by name (the prefill ends at "arguments": ) and a call among three tools
    (the model writes the name too), sampled at temperature 1 on made-up schemas: every answer
    is one tool call whose name is a tool's and whose arguments validate against its schema."""
    model, tok = micro
    rng = random.Random(2)
    close = ""  # the micro model's 64-token context has no room for the closing tag (SmolLM2's
    # server test has it); the parser reads a call whose tag is cut off all the same
    for n in range(8):
        tools = {f"f{k}": random_schema(rng, depth=1) for k in range(3)}  # flat: 64-token context
        one = {"f0": tools["f0"]}
        cases = [
            (one, True, f'{TOOL_CALL_OPEN}\n{{"name": "f0", "arguments": '),
            (tools, False, f'{TOOL_CALL_OPEN}\n{{"name": "'),
        ]
        for schemas, named, prefill in cases:
            grammar = tool_call_grammar(schemas, named, close)
            ids, constraint = _generate(model, tok, None, n, grammar, prefill)
            text = prefill + tok.decode(ids)
            assert constraint.finished and text.endswith("}"), text
            content, [call] = parse_tool_calls(text)
            name = call["function"]["name"]
            assert content is None and name in schemas, text
            assert check_json(call["function"]["arguments"], schemas[name]) is None, text


def test_the_call_grammar_ends_at_the_closing_tag(micro):
    """With the real closing tag: the arguments, `}`, a newline and </tool_call> are the whole
    rest of the call; then nothing (not even a stop token) may follow."""
    model, tok = micro
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    grammar = tool_call_grammar({"f": schema}, True, "\n</tool_call>")
    constraint = Constraint(tok, grammar, model.cfg.vocab_size, tok.stop_ids())
    for t in tok.encode('{"k": true}}\n</tool_call'):
        assert not constraint.banned()[0, t]
        constraint.advance(t)
    assert not constraint.finished
    constraint.advance(tok.encode(">")[0])
    assert constraint.finished


def test_a_bad_tool_schema_is_a_clear_error():
    with pytest.raises(ConfigError, match="objekt"):
        tool_call_grammar({"f": {"type": "objekt"}}, True, "\n</tool_call>")
    with pytest.raises(ConfigError, match="tool 'g'"):
        tool_call_grammar({"g": [1]}, True, "\n</tool_call>")


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "objekt"}, "objekt"),
        ({"type": "string", "pattern": "(("}, "regex"),
        ([1, 2], "must be an object"),
    ],
)
def test_a_bad_schema_is_a_clear_error(schema, words):
    with pytest.raises(ConfigError, match=words):
        json_grammar(schema)
