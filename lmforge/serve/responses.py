"""What `lmforge serve` answers: OpenAI's response bodies (chat.completion, text_completion, with
usage and logprobs), the model card, and the server-sent-event stream of chunks ending in
`data: [DONE]`.

The one idea: a streamed response has sent its 200 before generation ends, so a request that
ends without an answer (an engine error, the server stopping) becomes an `error` event inside
the stream, while the same request without streaming becomes an HTTP error; `finish_error`
decides what went wrong, for both.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable

from lmforge.safety.redact import PIIRedactor
from lmforge.serve.protocol import APIError, web_stack_error
from lmforge.serve.state import Server, request_events

try:
    from fastapi.responses import StreamingResponse
except ImportError as e:  # the core install has no web stack
    raise web_stack_error(e) from None


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    return {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )


def finish_error(req) -> APIError | None:
    """A request that ended without an answer (client gone, engine error, server stopping)."""
    if not req.done:  # the client disconnected: nobody reads this
        return APIError(499, "the client closed the connection")
    if req.finish_reason == "error":
        return APIError(500, f"generation failed: {req.error}", "server_error")
    if req.finish_reason == "cancelled":
        return APIError(
            503, "the request was cancelled: the server is shutting down", "server_error"
        )
    return None


def model_card(srv: Server) -> dict:
    card = {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "lmforge"}
    if srv.engine is not None:
        card["max_model_len"] = srv.engine.cfg.max_seq_len  # vLLM's field: the web page uses it
    return card


# --------------------------------------------------------------------------- whole responses


async def reply(
    http, srv: Server, body, req, events, chunks: Callable, kind: str, choice, extra=None
):
    """The response to a queued request: an SSE stream of `chunks`, or, once generation has
    finished, one `kind` object whose choice is `choice(text)`, with the top-level fields
    `extra(text)` adds (lmforge's extensions, e.g. retrieval's sources)."""
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(chunks(http, srv, req, events, usage))
    pieces = [piece async for piece, _, _ in answer_events(http, srv, req, events)]
    if err := finish_error(req):
        raise err
    # output moderation tripped: the answer is the refusal alone (the last piece)
    text = pieces[-1] if req.finish_reason == "content_filter" else "".join(pieces)
    return {**_response(req, req.id, kind, srv, choice(text)), **(extra(text) if extra else {})}


async def answer_events(http, srv: Server, req, events):
    """request_events as the client sees them. With output moderation (serve/moderation.py)
    text is released once the moderator has read it; a flagged answer is cancelled, and its
    last piece is the refusal message, with finish reason content_filter. With --redact-pii,
    each piece is the part of the text that is final, scrubbed, and the last piece also what
    was held back."""
    redactor = PIIRedactor() if srv.redact_pii else None
    screen = srv.moderation.output_screen() if srv.moderation else None
    stream = request_events(http, req, events)
    async for piece, done, n in stream:
        if screen:
            piece = await screen.feed(piece, done)
            if screen.tripped:
                req.cancel()  # the engine frees the slot at its next step; drain until then
                async for event in stream:
                    n = event[2]
                if not req.done:  # the client went away meanwhile
                    return
                req.finish_reason, piece, done = "content_filter", srv.moderation.message, True
        if redactor:
            piece = redactor.feed(piece) + (redactor.finish() if done else "")
        yield piece, done, n
        if done:
            return


def _usage(req) -> dict:
    p, c = len(req.prompt_ids), len(req.output_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _response(req, rid: str, obj: str, srv: Server, choice: dict) -> dict:
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": srv.model_name,
        "choices": [choice],
        "usage": _usage(req),
    }


def chat_logprobs(tok, req, start: int, end: int) -> dict | None:
    if not req.params.logprobs:
        return None
    content = []
    for i, lp in zip(req.output_ids[start:end], req.logprobs[start:end]):
        token = tok.decode([i])
        content.append(
            {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": []}
        )
    return {"content": content}


def text_logprobs(tok, req, start: int, end: int, offset: int) -> dict | None:
    if not req.params.logprobs:
        return None
    tokens = [tok.decode([i]) for i in req.output_ids[start:end]]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": req.logprobs[start:end],
        "top_logprobs": None,
        "text_offset": offsets,
    }


# --------------------------------------------------------------------------- streaming


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)


async def chat_chunks(
    http,
    srv: Server,
    req,
    events,
    include_usage: bool,
    parser=None,
    prefill: str = "",
    first: dict | None = None,
    last: Callable | None = None,
    logprobs: bool = True,
):
    """The chat stream; with a ToolCallParser (the request has tools) the text goes through
    it, `prefill` first (a forced call's opening), so calls arrive as `tool_calls` deltas.
    `first`: top-level fields of the first chunk; `last(text)`: those of the finish chunk.
    `logprobs=False` keeps recorded logprobs out of the chunks (only `confidence` wanted them)."""
    created = int(time.time())
    text = []

    def chunk(delta: dict, finish=None, logprobs=None, extra=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        obj = {"id": req.id, "object": "chat.completion.chunk", "created": created}
        obj.update(model=srv.model_name, choices=[choice], **(extra or {}))
        return _sse({**obj, "usage": None} if include_usage else obj)

    yield chunk({"role": "assistant", "content": ""}, extra=first)
    parse = parser.feed if parser else lambda piece: [{"content": piece}] if piece else []
    for delta in parse(prefill):
        yield chunk(delta)
    seen = 0
    async for piece, _, n in answer_events(http, srv, req, events):
        text.append(piece)
        for i, delta in enumerate(parse(piece)):  # logprobs go with the first delta they made
            shown = logprobs and not i
            yield chunk(delta, logprobs=chat_logprobs(srv.tok, req, seen, n) if shown else None)
            seen = n
    for delta in parser.finish() if parser and req.done else []:
        yield chunk(delta)
    finish = req.finish_reason
    if parser and parser.calls and finish == "stop":
        finish = "tool_calls"
    tail_fields = last("".join(text)) if last else None
    async for tail in _stream_end(req, srv, include_usage, chunk({}, finish, extra=tail_fields)):
        yield tail


async def text_chunks(http, srv: Server, req, events, include_usage: bool):
    created = int(time.time())

    def chunk(text: str, finish=None, logprobs=None) -> str:
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        obj = {"id": req.id, "object": "text_completion", "created": created}
        obj.update(model=srv.model_name, choices=[choice])
        return _sse({**obj, "usage": None} if include_usage else obj)

    seen, offset = 0, 0
    async for piece, _, n in answer_events(http, srv, req, events):
        if piece:
            yield chunk(piece, logprobs=text_logprobs(srv.tok, req, seen, n, offset))
            seen, offset = n, offset + len(piece)
    async for tail in _stream_end(req, srv, include_usage, chunk("", req.finish_reason)):
        yield tail


async def _stream_end(req, srv: Server, include_usage: bool, last: str):
    """The finish chunk, the usage chunk when asked for, then [DONE]; an error event instead
    when the request ended without an answer (headers are sent: the status is already 200)."""
    if not req.done:  # the client went away
        return
    if err := finish_error(req):
        body = {"message": err.message, "type": err.type, "param": None, "code": err.code}
        yield _sse({"error": body})
    else:
        yield last
        if include_usage:
            obj = "chat.completion.chunk" if req.id.startswith("chatcmpl") else "text_completion"
            usage = {"id": req.id, "object": obj, "created": int(time.time())}
            usage.update(model=srv.model_name, choices=[], usage=_usage(req))
            yield _sse(usage)
    yield "data: [DONE]\n\n"
