"""What a request to `lmforge serve` may say, and how its body is read: OpenAI's request shapes
(pydantic models with OpenAI's ranges), the fields refused rather than silently ignored, and the
checks every body passes before a model sees it (content type, size, arrival deadline, JSON depth,
lone surrogates).

The one idea: every way a body can be wrong ends here as an `APIError`, a 4xx in OpenAI's error
shape naming the field, so nothing a client sends reaches the engine thread unchecked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from typing import Literal

from lmforge.config import ConfigError
from lmforge.infer.constrain import json_grammar


def web_stack_error(e: ImportError) -> ConfigError:
    """The error for a core install without the `serve` extra."""
    return ConfigError(
        f"lmforge serve needs FastAPI and uvicorn ({e.name} is missing): "
        "pip install 'lmforge[serve]'"
    )


try:
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
except ImportError as e:  # the core install has no web stack
    raise web_stack_error(e) from None

log = logging.getLogger("lmforge.serve")
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # stop strings per request (OpenAI's 4), characters in each


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type="invalid_request_error",
        param=None,
        code=None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


# --------------------------------------------------------------------------- request bodies
# Strict: "5" is not an int and "true" is not a bool, as with OpenAI. Fields OpenAI has and we
# do not use (user, metadata, store, ...) are ignored; ones that would change the answer and
# are not supported are refused in `refuse_unsupported`.


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):  # many clients send "temperature": null for "not set"
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str | None = None  # optional: there is one model
    max_tokens: int | None = Field(None, ge=1)
    # OpenAI's ranges, and a finite number (NaN or infinity: 400 naming the field)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)  # ~0 keeps the top token only
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    # extensions, with vLLM's names
    top_k: int = Field(0, ge=-1)  # 0 or -1 = off
    # 1 = off; 0.01-100 keeps the penalised logits finite (vLLM takes any value > 0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, allow_inf_nan=False)
    ignore_eos: bool = False  # no stop tokens: always generate max_tokens (benchmarks)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class CalledFunction(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message may carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self


class FunctionDef(Strict):
    # OpenAI's rule for a function name: what a model can write back without escaping
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for the name
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the grammar always holds the output to the schema


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object')
        return self


def response_grammar(fmt: ResponseFormat | None) -> str | None:
    """The grammar that holds a reply to `response_format` (None: free text); a schema the
    grammar compiler refuses is a 400 naming the field."""
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
    try:
        return json_grammar(schema)
    except ConfigError as e:
        param = "response_format.json_schema.schema" if schema is not None else "response_format"
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None


class RetrievalOption(Strict):
    """`retrieval`, an lmforge extension (serve/retrieval.py): answer from an index's chunks."""

    index: str  # a name given to --rag at start
    k: int = Field(3, ge=1, le=20)  # chunks in the prompt, before fitting the context
    min_bm25: float = 0.0  # the `rag query` thresholds
    min_dense: float = 0.3
    # untrusted text: rule detection holds chunks back, spotlighting marks the rest as data
    defence: Literal["none", "detect", "spotlight", "both"] = "both"


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None  # json_object / json_schema: constrained
    retrieval: RetrievalOption | None = None  # lmforge's: ground the answer in a --rag index
    # lmforge's: a top-level `confidence` object in the response (infer/confidence.py)
    confidence: Literal["logprob", "self_consistency"] | None = None
    confidence_samples: int = Field(5, ge=1, le=16)  # k extra answers for self_consistency


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


def check_tool_choice(body: ChatRequest) -> None:
    """400 naming tool_choice when it asks for a call the tools cannot make."""
    choice, names = body.tool_choice, [t.function.name for t in body.tools or []]
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and not names:
        raise APIError(
            400, "tool_choice asks for a tool call but tools is empty", param="tool_choice"
        )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(
            400,
            f"tool_choice names the function {choice.function.name!r}, which is not in tools "
            f"({', '.join(names)})",
            param="tool_choice",
        )


def plain_message(m: Message) -> dict:
    """{"role", "content": str}: text parts joined; OpenAI's "developer" is the system role.
    An assistant's tool_calls and a tool result's tool_call_id come along, with each call's
    arguments as a JSON object when they are one (chat templates write them with tojson)."""
    parts = m.content if isinstance(m.content, list) else []
    content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in parts)
    out = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": _json_or_text(c.function.arguments),
                },
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _json_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:  # a model's malformed call sent back as it was: render it as written
        return arguments


def refuse_unsupported(body: Sampling) -> None:
    unsupported = {
        "n": body.n != 1,
        "presence_penalty": body.presence_penalty != 0,
        "frequency_penalty": body.frequency_penalty != 0,
        "top_logprobs": bool(getattr(body, "top_logprobs", None)),
        "logprobs": bool(getattr(body, "logprobs", 0)) and isinstance(body, CompletionRequest),
        "echo": getattr(body, "echo", False),
        "best_of": getattr(body, "best_of", None) not in (None, 1),
        "suffix": getattr(body, "suffix", None) is not None,
    }
    for name, bad in unsupported.items():
        if bad:
            value = getattr(body, name)
            raise APIError(400, f"{name}={value!r} is not supported by this server", param=name)
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop takes at most {MAX_STOPS} sequences", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(
            400, f"a stop sequence may be at most {MAX_STOP_CHARS} characters", param="stop"
        )


# OpenAI request fields this server does not implement, with the test "does this value ask for
# a different answer than we give?". Such a value is refused (400 naming the field) rather than
# ignored: the client would silently get something other than it asked for. Null is the default.
# Fields that do not change the answer are ignored (CHAT_IGNORED); so are keys OpenAI does not
# have (other servers' extras). Every field of OpenAI's chat request is in one of CHAT_FIELDS,
# CHAT_NOT_IMPLEMENTED and CHAT_IGNORED (tests/serve/test_tools.py checks this against the
# openai client's own list).
CHAT_FIELDS = {  # implemented: ChatRequest reads them
    *("messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p"),
    *("n", "stop", "seed", "stream", "stream_options", "presence_penalty"),
    *("frequency_penalty", "logprobs", "top_logprobs", "tools", "tool_choice"),
    *("parallel_tool_calls", "response_format"),
}
CHAT_IGNORED = {  # who asks, caching and latency hints: the answer is the same without them
    *("user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_options"),
    *("prompt_cache_retention", "safety_identifier", "prediction"),
}
CHAT_NOT_IMPLEMENTED: dict[str, Callable[[object], bool]] = {
    "logit_bias": lambda v: v != {},
    "functions": lambda v: v != [],  # the deprecated form of tools: send `tools`
    "function_call": lambda v: v not in ("none", "auto"),
    "moderation": lambda v: True,  # scoring or blocking the text would change the answer
    "modalities": lambda v: v != ["text"],
    "audio": lambda v: True,
    "web_search_options": lambda v: True,  # {} turns web search on with its defaults
    "reasoning_effort": lambda v: True,  # this is not a reasoning model
    "verbosity": lambda v: v != "medium",
}
COMPLETIONS_NOT_IMPLEMENTED: dict[str, Callable[[object], bool]] = {
    "logit_bias": lambda v: v != {},
}
COMPLETIONS_IGNORED = {"user"}  # the other fields are CompletionRequest's (some default-only)


def refuse_not_implemented(obj: dict, fields: dict) -> None:
    """400 naming the first field of `fields` set to a value that would change the answer."""
    for name, changes_answer in fields.items():
        value = obj.get(name)
        if value is not None and changes_answer(value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise APIError(
                400,
                f"{name}={shown} is not supported by this server",
                param=name,
                code="unsupported_parameter",
            )


# --------------------------------------------------------------------------- reading a body


async def read_json(http: Request, limit: int, timeout: float) -> dict:
    """The body as a JSON object: 415 unless it is declared `application/json`, 413 past
    `limit` bytes, 408 when it has not all arrived within `timeout` seconds, 400 when it is not
    JSON, is nested too deeply or holds a string that is not valid Unicode."""
    check_content_type(http.headers.get("content-type", ""))
    body = await read_body(http, limit, timeout)
    try:
        obj = json.loads(body)
    except RecursionError:  # json's C parser recurses once per level: 2,000 "[" are enough
        raise _too_deep() from None
    except ValueError as e:
        raise APIError(
            400, f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    check_json_tree(obj)
    return obj


def check_content_type(value: str) -> None:
    """Only `application/json` (any parameters): a web page on another site may POST
    `text/plain` or a form to this server without the browser asking first (no CORS
    preflight), but not `application/json`."""
    media = value.partition(";")[0].strip().lower()
    if media != "application/json":
        got = f"Content-Type {value!r}" if value else "no Content-Type"
        raise APIError(
            415,
            f"the request has {got}; send the JSON body with 'Content-Type: application/json'",
            code="unsupported_media_type",
        )


async def read_body(http: Request, limit: int, timeout: float) -> bytes:
    """The raw body, read against one deadline for all of it, so that a client sending a
    byte now and then cannot hold a connection (and its file descriptor) for ever."""
    from starlette.requests import ClientDisconnect

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body, total = bytearray(), 0
    chunks = http.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), max(deadline - loop.time(), 0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            client = f"{http.client.host}:{http.client.port}" if http.client else "a client"
            log.warning(
                "connection from %s dropped: the request body did not arrive within %g s",
                client,
                timeout,
            )
            raise APIError(
                408,
                f"the request body did not arrive within {timeout:g} s",
                code="request_timeout",
                headers={"Connection": "close"},  # the rest of the body may still come
            ) from None
        except ClientDisconnect:  # nobody will read the answer; no traceback in the log
            raise APIError(499, "the client closed the connection") from None
        total += len(chunk)
        if total <= limit:
            body += chunk
        elif total > 4 * limit:  # read a little past the limit so the client sees our answer
            break
    if total > limit:
        raise APIError(
            413,
            f"the request body is over this server's limit of {limit} bytes",
            param=None,
            code="request_too_large",
        )
    return bytes(body)


MAX_JSON_DEPTH = 32  # a request is messages > content parts > text: 4 levels; tools go deeper
_SURROGATE = re.compile("[\ud800-\udfff]")


def _too_deep() -> APIError:
    return APIError(
        400,
        f"the request body is nested more than {MAX_JSON_DEPTH} levels deep",
        code="invalid_json",
    )


def check_json_tree(obj: dict) -> None:
    """Refuse what JSON allows but the server cannot use: nesting past MAX_JSON_DEPTH (code
    that walks it later would recurse), and lone UTF-16 surrogates: "\\ud800" is valid JSON
    but not Unicode, and the tokenizer cannot encode it. Walked with a stack, not recursion."""
    stack = [(obj, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            if isinstance(node, str) and (bad := _SURROGATE.search(node)):
                where = ".".join(map(str, path))
                raise APIError(
                    400,
                    f"{where}: holds a lone UTF-16 surrogate (\\u{ord(bad.group()):04x} at "
                    f"character {bad.start()}), which is not valid Unicode",
                    param=str(path[0]),
                    code="invalid_value",
                )
            continue
        for key, value in items:
            if isinstance(key, str) and _SURROGATE.search(key):
                raise APIError(
                    400, "a JSON key holds a lone UTF-16 surrogate", code="invalid_value"
                )
            stack.append((value, (*path, key), depth + 1))


def validate(cls, obj: dict):
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


def validation_error(errors) -> APIError:
    err = errors[0]
    loc = [str(x) for x in err["loc"] if x != "body"]
    where = ".".join(loc)
    return APIError(
        400,
        f"{where}: {err['msg']}" if where else err["msg"],
        param=loc[0] if loc else None,
        code="invalid_value" if "type" not in err["type"] else "invalid_type",
    )
