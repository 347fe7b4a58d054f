"""The OpenAI-compatible HTTP server (`lmforge serve`): /v1/chat/completions, /v1/completions,
/v1/models, /health, and the web chat page under / and /static.

The one idea: the engine decodes every request in one background thread and calls back with
each text piece; the callback drops the piece into that request's inbox and wakes the event
loop through `loop.call_soon_threadsafe` (once, however many pieces arrive meanwhile), so an
HTTP request is a coroutine awaiting its inbox while one thread keeps all of them in one batch.
A request whose client goes away is cancelled, which frees its slot at the engine's next step.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
OpenAI uses: 400 bad request (or a Host this server does not answer to), 401 API key, 404
unknown model, 408 body too slow, 413 body too large, 415 not JSON, 429 queue full, 500 the
chat template failed or timed out, 503 model still loading. protocol.py holds the request
shapes and the checks on a body; guards.py what bounds hostile and slow clients.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.serve import guards
from lmforge.serve.guards import HostCheck, RenderBusy, RenderTimeout, TemplateRenderer
from lmforge.serve.protocol import (
    CHAT_NOT_IMPLEMENTED,
    COMPLETIONS_NOT_IMPLEMENTED,
    APIError,
    ChatRequest,
    CompletionRequest,
    Message,
    Sampling,
    read_json,
    refuse_not_implemented,
    refuse_unsupported,
    validate,
    validation_error,
    web_stack_error,
)

try:
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # the core install has no web stack
    raise web_stack_error(e) from None

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"
POLL_S = 0.5  # how often a waiting request checks whether its client is still there
SAMPLING_EPS = 1e-5  # temperatures below this are greedy (dividing logits by ~0 overflows)


# --------------------------------------------------------------------------- the server


class _Server:
    """The loaded model and engine, the limits, and what the endpoints share."""

    def __init__(
        self, load, model_name, api_key, max_batch, max_queue, max_tokens, max_bytes, invariant
    ):
        self._load = load
        self.batch_invariant = invariant
        self.model_name, self.api_key = model_name, api_key
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_tokens, self.max_bytes = max_tokens, max_bytes
        self.engine = self.tok = None
        self.load_error: str | None = None
        self.on_load_error: Callable[[str], None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.created = int(time.time())
        self.finished: Counter[str] = Counter()  # finish reasons so far (tests, /health)
        # set by create_app: other names accepted for the model, the body deadline, the
        # template renderer, the Host names asked for (None = the default for the address)
        self.aliases: set[str] = set()
        self.request_timeout = 30.0
        self.render = TemplateRenderer()
        self.allowed_hosts_arg: list[str] | None = None
        self.bind("127.0.0.1")

    def bind(self, host: str) -> None:
        """The address the server listens on decides the default Host names (DNS rebinding)."""
        self.host = host
        self.allowed_hosts = guards.allowed_hosts(host, self.allowed_hosts_arg)

    async def load(self) -> None:
        from lmforge.infer.engine import Engine

        try:
            model, tok = await asyncio.to_thread(self._load)
            engine = Engine(model, tok, self.max_batch, self.max_queue, self.batch_invariant)
        except Exception as e:
            self.load_error = f"{e}" if isinstance(e, ConfigError | OSError) else repr(e)
            log.error("the model failed to load: %s", self.load_error)
            if self.on_load_error:
                self.on_load_error(self.load_error)
            return
        engine.start()
        self.engine, self.tok = engine, tok
        log.info("serving %s (%d tokens of context)", self.model_name, model.cfg.max_seq_len)

    async def close(self) -> None:
        """In-flight requests have finished (uvicorn waits for them); cancel any left."""
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, cancel=True, timeout=10)

    def ready(self):
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", "server_error")
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                "server_error",
                code="model_loading",
            )
        if not self.engine._thread.is_alive():
            raise APIError(503, "the engine thread has stopped", "server_error")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name and name not in self.aliases:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    # --- generation

    def params(self, body: Sampling, max_tokens: int | None, logprobs: bool):
        from lmforge.infer.chat import stop_ids
        from lmforge.infer.engine import SamplingParams

        self.check_model(body.model)
        refuse_unsupported(body)
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise APIError(
                400,
                f"max_tokens is {max_tokens} but this server allows at most {self.max_tokens}",
                param="max_tokens",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop = [s for s in stop if s]  # "" would stop before the first character: ignored
        chat = isinstance(body, ChatRequest)
        ids = () if body.ignore_eos else stop_ids(self.tok) if chat else (self.tok.eos_id,)
        return SamplingParams(
            max_tokens=max_tokens or self.max_tokens,  # the engine also stops at the context
            temperature=body.temperature if body.temperature >= SAMPLING_EPS else 0.0,
            top_k=max(body.top_k, 0),
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=stop,
            stop_ids=ids,
            logprobs=logprobs,
        )

    def submit(self, prompt_ids: list[int], params, rid: str, param: str):
        """Queue a request; returns (engine request, the inbox of its events)."""
        from lmforge.infer.engine import QueueFull

        engine = self.ready()
        n_ctx = engine.cfg.max_seq_len
        if len(prompt_ids) >= n_ctx:
            raise APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {n_ctx} "
                "(and at least one new token must fit)",
                param=param,
                code="context_length_exceeded",
            )
        events = _Inbox(self.loop)
        t0 = time.perf_counter()

        def on_event(req, piece: str, done: bool) -> None:  # the engine thread
            n = len(req.output_ids)  # tokens so far, read here: the list grows in this thread
            if done:
                self.finished[req.finish_reason] += 1
                latency = time.perf_counter() - t0
                error = f" error={req.error}" if req.error else ""
                log.info(
                    f"{req.id} prompt={len(req.prompt_ids)} completion={n} latency={latency:.3f}s "
                    f"finish={req.finish_reason}{error}"
                )
            events.put((piece, done, n))

        try:
            req = engine.submit(prompt_ids, params, on_event=on_event, request_id=rid)
        except QueueFull as e:
            raise APIError(
                429, f"{e}; retry later", "rate_limit_error", code="queue_full"
            ) from None
        except ConfigError as e:
            raise APIError(400, str(e), param=param) from None
        return req, events


class _Inbox:
    """Events from the engine thread to one request's coroutine. However many tokens arrive
    while the coroutine is busy, the event loop is woken once (one `call_soon_threadsafe`,
    which costs a system call), and the coroutine takes them all at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.ready = loop, collections.deque(), asyncio.Event()
        self.wake_pending = False

    def put(self, item: tuple) -> None:  # the engine thread
        self.items.append(item)
        if not self.wake_pending:
            self.wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _wake(self) -> None:  # the event loop
        self.wake_pending = False
        self.ready.set()

    async def take(self, timeout: float) -> list[tuple]:
        """Everything that arrived, waiting up to `timeout` (asyncio.TimeoutError)."""
        await asyncio.wait_for(self.ready.wait(), timeout)
        self.ready.clear()
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out


async def _events(http: Request, req, events: _Inbox) -> AsyncIterator[tuple]:
    """(piece, done, n_tokens) events until done, pieces already waiting merged into one. If
    the client goes away (a disconnect seen here, or the streaming response cancelling us) the
    request is cancelled, freeing its slot."""
    try:
        while True:
            try:
                batch = await events.take(POLL_S)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return
                continue
            if not batch:
                continue
            _, done, n = batch[-1]  # the engine sends done last
            yield "".join(piece for piece, _, _ in batch), done, n
            if done:
                return
    finally:
        if not req.done:
            req.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(req) -> dict:
    p, c = len(req.prompt_ids), len(req.output_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish_error(req) -> APIError | None:
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


# --------------------------------------------------------------------------- the app


def create_app(
    model,
    model_name: str | None = None,
    *,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_tokens: int = 1024,
    max_request_bytes: int = 1 << 20,
    device: str = "auto",
    batch_invariant: bool = True,
    allowed_hosts: list[str] | None = None,
    request_timeout: float = 30.0,
    template_timeout: float = 10.0,
) -> FastAPI:
    """The FastAPI app. `model` is a model or LoRA adapter directory, a (model, tokenizer)
    pair, or a function returning one; it is loaded in the background at startup, and /health
    answers 503 until it is ready. `model_name` is the id clients use (default: the directory's
    name; the path given is accepted too but never shown). `max_tokens` caps (and is the default
    of) a request's max_tokens; `api_key`, when set, is required as `Authorization: Bearer KEY`
    on /v1/*. `batch_invariant=False` lets the engine run only its busy rows (see
    infer/engine.py). `allowed_hosts`: the Host names answered (see guards.allowed_hosts; "*" =
    any); `request_timeout`: seconds for a request's body to arrive; `template_timeout`:
    seconds for the chat template to render."""
    if min(max_batch, max_tokens, max_request_bytes) < 1 or max_queue < 0:
        raise ConfigError(
            "max_batch, max_tokens and max_request_bytes must be >= 1, max_queue >= 0"
        )
    if not (request_timeout > 0 and template_timeout > 0):
        raise ConfigError("request_timeout and template_timeout must be > 0 seconds")
    aliases = set()
    if isinstance(model, str | Path):
        path = Path(model)
        if not path.is_dir():
            raise ConfigError(f"{path} is not a model or adapter directory")

        def load():
            from lmforge.model.load import load as load_model_dir
            from lmforge.perf import pick_device

            return load_model_dir(path, device=pick_device(device))

        # the directory's name, not its path: /v1/models must not tell clients our file layout
        model_name = model_name or path.resolve().name
        aliases = {str(model), str(path)}  # clients configured with the path keep working
    elif isinstance(model, tuple | list):
        pair = tuple(model)

        def load():
            return pair

    else:
        load = model
    srv = _Server(
        load,
        model_name or "lmforge",
        api_key,
        max_batch,
        max_queue,
        max_tokens,
        max_request_bytes,
        batch_invariant,
    )
    srv.aliases = aliases
    srv.request_timeout = request_timeout
    srv.render = TemplateRenderer(slots=2, timeout=template_timeout)
    srv.allowed_hosts_arg = allowed_hosts
    srv.bind("127.0.0.1")  # until serve() says otherwise (tests run uvicorn themselves)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.loop = asyncio.get_running_loop()
        loading = asyncio.create_task(srv.load())  # so that /health answers 503 meanwhile
        try:
            yield
        finally:
            loading.cancel()
            await srv.close()

    app = FastAPI(
        title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = srv

    def wrong_host(header: str, names: list[str]) -> JSONResponse:
        return APIError(
            400,
            f"the Host header {header!r} is not a name this server answers to ({', '.join(names)})"
            "; if clients reach it by that name, start it with --allowed-hosts",
            code="invalid_host",
        ).response()

    app.add_middleware(HostCheck, allowed=lambda: srv.allowed_hosts, error=wrong_host)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):  # FastAPI's 422 -> OpenAI's 400
        return validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), _error_type(e.status_code)).response()

    def authorize(request: Request) -> None:
        if srv.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                "authentication_error",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), srv.api_key.encode()):
            raise APIError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    # --- the page and health

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise APIError(404, "the web chat page is not installed", code="not_found")
        return FileResponse(page)

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    @app.get("/health")
    async def health():
        try:
            engine = srv.ready()
        except APIError as e:
            status = "error" if srv.load_error or srv.engine is not None else "loading"
            return JSONResponse({"status": status, "message": e.message}, status_code=503)
        return {"status": "ok", "running": engine.active(), "waiting": engine.pending()}

    # --- the OpenAI API

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [_model_card(srv)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model_card(name: str):
        srv.check_model(name)
        return _model_card(srv)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(http: Request):
        from lmforge.infer.chat import chat_prompt_ids

        srv.ready()
        obj = await read_json(http, srv.max_bytes, srv.request_timeout)
        body = validate(ChatRequest, obj)
        refuse_not_implemented(obj, CHAT_NOT_IMPLEMENTED)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = srv.params(body, max_tokens, body.logprobs)
        messages = [_plain_message(m) for m in body.messages]
        prompt_ids = await _render(srv, lambda: chat_prompt_ids(srv.tok, messages))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        req, events = srv.submit(prompt_ids, params, rid, "messages")

        def choice(text: str) -> dict:
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": _chat_logprobs(srv.tok, req, 0, len(req.output_ids)),
                "finish_reason": req.finish_reason,
            }

        return await _reply(http, srv, body, req, events, _chat_chunks, "chat.completion", choice)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(http: Request):
        srv.ready()
        obj = await read_json(http, srv.max_bytes, srv.request_timeout)
        body = validate(CompletionRequest, obj)
        refuse_not_implemented(obj, COMPLETIONS_NOT_IMPLEMENTED)
        params = srv.params(body, body.max_tokens, body.logprobs is not None)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "a list of several prompts is not supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            tok = srv.tok
            prompt = ([tok.bos_id] if tok.prepend_bos else []) + tok.encode(prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        req, events = srv.submit(prompt, params, rid, "prompt")

        def choice(text: str) -> dict:
            return {
                "text": text,
                "index": 0,
                "logprobs": _text_logprobs(srv.tok, req, 0, len(req.output_ids), 0),
                "finish_reason": req.finish_reason,
            }

        return await _reply(http, srv, body, req, events, _text_chunks, "text_completion", choice)

    return app


async def _render(srv: _Server, render: Callable[[], list[int]]) -> list[int]:
    """The chat template rendered off the event loop, under srv.render's time limit: a
    template is code from the model's files, and one that loops must cost only its request."""
    try:
        return await srv.render(render)
    except ConfigError as e:
        raise APIError(400, str(e), param="messages") from None
    except RenderTimeout as e:
        log.error("%s; the request got 500", e)
        raise APIError(
            500, f"{e}; it may loop for ever", "server_error", code="template_timeout"
        ) from None
    except RenderBusy as e:
        raise APIError(503, f"{e}; retry later", "server_error", code="template_busy") from None
    except Exception as e:  # a broken template (the sandbox's range limit, a raise_exception)
        log.error("the chat template failed: %r", e)
        raise APIError(500, f"the chat template failed: {e!r}", "server_error") from None


async def _reply(http, srv, body, req, events, chunks, kind: str, choice):
    """The response to a queued request: an SSE stream of `chunks`, or, once generation has
    finished, one `kind` object whose choice is `choice(text)`."""
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(chunks(http, srv, req, events, usage))
    text = "".join([piece async for piece, _, _ in _events(http, req, events)])
    if err := _finish_error(req):
        raise err
    return _response(req, req.id, kind, srv, choice(text))


def _error_type(status: int) -> str:
    return {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )


def _model_card(srv: _Server) -> dict:
    card = {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "lmforge"}
    if srv.engine is not None:
        card["max_model_len"] = srv.engine.cfg.max_seq_len  # vLLM's field: the web page uses it
    return card


def _plain_message(m: Message) -> dict:
    """{"role", "content": str}: text parts joined; OpenAI's "developer" is the system role."""
    parts = m.content if isinstance(m.content, list) else []
    content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in parts)
    return {"role": "system" if m.role == "developer" else m.role, "content": content}


def _response(req, rid: str, obj: str, srv: _Server, choice: dict) -> dict:
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": srv.model_name,
        "choices": [choice],
        "usage": _usage(req),
    }


def _chat_logprobs(tok, req, start: int, end: int) -> dict | None:
    if not req.params.logprobs:
        return None
    content = []
    for i, lp in zip(req.output_ids[start:end], req.logprobs[start:end]):
        token = tok.decode([i])
        content.append(
            {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": []}
        )
    return {"content": content}


def _text_logprobs(tok, req, start: int, end: int, offset: int) -> dict | None:
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


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)


async def _chat_chunks(http, srv: _Server, req, events, include_usage: bool):
    created = int(time.time())

    def chunk(delta: dict, finish=None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        obj = {"id": req.id, "object": "chat.completion.chunk", "created": created}
        obj.update(model=srv.model_name, choices=[choice])
        return _sse({**obj, "usage": None} if include_usage else obj)

    yield chunk({"role": "assistant", "content": ""})
    seen = 0
    async for piece, _, n in _events(http, req, events):
        if piece:
            yield chunk({"content": piece}, logprobs=_chat_logprobs(srv.tok, req, seen, n))
            seen = n
    async for tail in _stream_end(req, srv, include_usage, chunk({}, req.finish_reason)):
        yield tail


async def _text_chunks(http, srv: _Server, req, events, include_usage: bool):
    created = int(time.time())

    def chunk(text: str, finish=None, logprobs=None) -> str:
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        obj = {"id": req.id, "object": "text_completion", "created": created}
        obj.update(model=srv.model_name, choices=[choice])
        return _sse({**obj, "usage": None} if include_usage else obj)

    seen, offset = 0, 0
    async for piece, _, n in _events(http, req, events):
        if piece:
            yield chunk(piece, logprobs=_text_logprobs(srv.tok, req, seen, n, offset))
            seen, offset = n, offset + len(piece)
    async for tail in _stream_end(req, srv, include_usage, chunk("", req.finish_reason)):
        yield tail


async def _stream_end(req, srv: _Server, include_usage: bool, last: str):
    """The finish chunk, the usage chunk when asked for, then [DONE]; an error event instead
    when the request ended without an answer (headers are sent: the status is already 200)."""
    if not req.done:  # the client went away
        return
    if err := _finish_error(req):
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


# --------------------------------------------------------------------------- running it


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_connections: int = 256,
    **uvicorn_kwargs,
) -> int:
    """Run the app with uvicorn until Ctrl-C / SIGTERM (graceful: stop accepting, let running
    requests finish for up to 30 s, then cancel the rest and stop the engine). A model that
    fails to load stops the server at once and raises ConfigError. At most `max_connections`
    are open at once; a request's header must arrive within the app's request_timeout."""
    srv: _Server = app.state.server
    if max_connections < 1:
        raise ConfigError(f"max_connections must be >= 1, got {max_connections}")
    srv.bind(host)
    if srv.api_key is None and not guards.is_loopback(host):
        log.warning(
            "listening on %s without an API key: anyone who can reach this port can use the "
            "model (and the page at /); pass --api-key-file or set LMFORGE_API_KEY",
            host,
        )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=30,
        http=guards.guarded_http_protocol(max_connections, srv.request_timeout),
        **uvicorn_kwargs,
    )
    server = uvicorn.Server(config)

    def stop(message: str) -> None:
        server.should_exit = True

    srv.on_load_error = stop
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        pass
    if srv.load_error:
        raise ConfigError(f"the model failed to load: {srv.load_error}")
    return 0
