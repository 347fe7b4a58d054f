"""Constrained decoding: a request's output is kept inside a grammar (a JSON schema, or any JSON
object), so that even a small model's answer always parses and validates.

The one idea: before each token is sampled, the grammar's matcher says which tokens may come
next, and every other logit is set to -inf; the sampled token then advances the matcher. Once
the JSON has closed, only the stop tokens stay allowed (and when nothing at all may follow,
generation ends there). The matcher is llguidance's (docs/constrained.md says why that library:
no dependencies, a CPU wheel, ~0.05-0.3 ms a token and ~2 ms to compile a schema with SmolLM2's
49k-token vocabulary).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence

import torch

from lmforge.config import ConfigError

# canonical separators and no free whitespace: `json.dumps` style, and a model cannot loop on
# blank lines inside the object (llguidance's default allows any run of whitespace)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise ConfigError(
            "constrained decoding needs llguidance: pip install 'lmforge[grammar]'"
        ) from e
    return llguidance


def has_llguidance() -> bool:
    """Whether the grammar library is installed (the `grammar` extra)."""
    try:
        _llguidance()
        return True
    except ConfigError:
        return False


def json_grammar(schema: dict | bool | None = None) -> str:
    """The grammar (llguidance's serialized form) for JSON valid against `schema`; None is any
    JSON object (OpenAI's json_object). A schema the compiler cannot use raises ConfigError
    with its reason."""
    llg = _llguidance()
    schema = ANY_OBJECT if schema is None else schema
    if not isinstance(schema, dict | bool):
        raise ConfigError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise ConfigError(f"invalid JSON schema: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ConfigError(f"unsupported JSON schema: {messages[0]}")
    return grammar


def _literal(text: str) -> str:
    """A Lark string literal for `text` (JSON's escaping is Lark's)."""
    return json.dumps(text)


def tool_call_grammar(tools: dict[str, dict | None], name_given: bool, close: str) -> str:
    """The grammar for the rest of a forced tool call, written after a prefill that ends at
    `"arguments": ` (`name_given`, one tool) or at `{"name": "` (the model picks one of
    `tools`, name -> JSON schema of its arguments, None: any object): the name, the arguments
    valid against that tool's schema, then `}` and `close` (e.g. a newline and </tool_call>),
    after which nothing may follow. A schema the compiler cannot use raises ConfigError naming
    the tool."""
    llg = _llguidance()
    if name_given and len(tools) != 1:
        raise ValueError("a call whose name is given has exactly one tool")
    rules, alternatives = [], []
    for i, (name, schema) in enumerate(tools.items()):
        schema = ANY_OBJECT if schema is None else schema
        if not isinstance(schema, dict):
            raise ConfigError(f"tool {name!r}: parameters must be a JSON schema object")
        body = {**schema, "x-guidance": JSON_OPTIONS}  # the same JSON layout as json_grammar
        rules.append(f"args{i}: %json {json.dumps(body)}")
        head = "" if name_given else _literal(f'{name}", "arguments": ') + " "
        alternatives.append(f"{head}args{i}")
    start = f"start: ({' | '.join(alternatives)}) {_literal('}' + close)}"
    grammar = llg.LLMatcher.grammar_from_lark("\n".join([start, *rules]))
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ConfigError(f"unsupported tool parameters schema: {messages[0]}")
    return grammar


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer, vocab_size: int, stop_ids: Sequence[int]):
    """llguidance's view of the tokenizer (~0.4 s to build for 49k tokens): built once per
    tokenizer, vocabulary size and stop ids."""
    llg = _llguidance()
    key = (vocab_size, tuple(stop_ids))
    per_tok = _TOKENIZERS.setdefault(tokenizer, {})
    if key not in per_tok:
        spec = tokenizer._tok.to_str()  # tokenizers' JSON, which llguidance reads itself
        per_tok[key] = llg.LLTokenizer(spec, n_vocab=vocab_size, eos_token=list(stop_ids))
    return per_tok[key]


class Constraint:
    """One request's grammar state: `banned()` before sampling, `advance(token)` after."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int, stop_ids: Sequence[int]):
        llg = _llguidance()
        if not stop_ids:
            stop_ids = (tokenizer.eos_id,)  # the grammar needs an end; ours stops on its own
        self.matcher = llg.LLMatcher(_ll_tokenizer(tokenizer, vocab_size, stop_ids), grammar)
        if self.matcher.is_error():
            raise ConfigError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self.words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)  # the bitmask
        self.bits = torch.arange(32, dtype=torch.int32)

    def banned(self, device=None) -> torch.Tensor:
        """(1, V) bool: True for every token the grammar does not allow next."""
        import llguidance.torch as llt

        llt.fill_next_token_bitmask(self.matcher, self.words.view(1, -1))
        allowed = (self.words[:, None] >> self.bits) & 1  # bit j of word i: token 32 i + j
        return (allowed.flatten()[: self.vocab_size] == 0).view(1, -1).to(device)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Nothing may follow: the JSON is complete (only a stop token would be allowed)."""
        return self.matcher.is_stopped()


def check_json(text: str, schema: dict | None = None) -> str | None:
    """Why `text` is not JSON valid against `schema` (any JSON object when None), or None.
    Used by tests and benchmarks; needs `jsonschema` when a schema is given."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    if schema is None:
        return None if isinstance(value, dict) else "not a JSON object"
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=str)
    return errors[0].message if errors else None
