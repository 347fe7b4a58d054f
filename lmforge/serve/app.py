"""The OpenAI-compatible HTTP server (`lmforge serve`): the routes /v1/chat/completions,
/v1/completions, /v1/models, /health and the web chat page under / and /static, and `serve()`;
/v1/embeddings (embeddings.py) when an embedding model is given, /v1/moderations and the screens
around generation (moderation.py) when a moderation model is.

Around it, as vLLM separates its protocol from its routes: protocol.py holds the request shapes
and the checks on a body, responses.py the response bodies and the SSE stream, state.py the
model, the engine and each request's inbox (the one idea of the server is written there),
guards.py what bounds hostile and slow clients.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
OpenAI uses: 400 bad request (or a Host this server does not answer to), 401 API key, 404
unknown model (400 `content_policy_violation`: input flagged by moderation), 408 body too slow, 413 body too large, 415 not JSON, 429 queue full, 500 the
chat template failed or timed out, 503 model still loading.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.infer.chat import chat_prompt_ids
from lmforge.infer.embed import Embedder
from lmforge.infer.memory import check_strategy, fit_request
from lmforge.infer.toolcall import ToolCallParser, parse_tool_calls
from lmforge.infer.untrusted import Defence
from lmforge.perf import pick_device
from lmforge.serve import confidence, guards, retrieval
from lmforge.serve.embeddings import add_embedding_routes
from lmforge.serve.guards import HostCheck, TemplateRenderer
from lmforge.serve.moderation import Policy, add_moderation_routes, screen_input, user_texts
from lmforge.serve.protocol import (
    CHAT_NOT_IMPLEMENTED,
    COMPLETIONS_NOT_IMPLEMENTED,
    APIError,
    ChatRequest,
    CompletionRequest,
    check_tool_choice,
    plain_message,
    read_json,
    refuse_not_implemented,
    response_grammar,
    validate,
    validation_error,
    web_stack_error,
)
from lmforge.serve.responses import (
    chat_chunks,
    chat_logprobs,
    error_type,
    model_card,
    reply,
    text_chunks,
    text_logprobs,
)
from lmforge.serve.state import Server, model_loader
from lmforge.serve.tools import forced_tool_call, request_tools
from lmforge.tokenizer import TOOL_CALL_CLOSE

try:
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # the core install has no web stack
    raise web_stack_error(e) from None

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"


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
    embedding_model=None,
    rag_indexes: dict[str, str] | None = None,
    memory: str | None = None,
    redact_pii: bool = False,
    moderation: Policy | None = None,
    injection_model: str | None = None,
) -> FastAPI:
    """The FastAPI app. `model` is a model or LoRA adapter directory, a (model, tokenizer)
    pair, or a function returning one; it is loaded in the background at startup, and /health
    answers 503 until it is ready. `model_name` is the id clients use (default: the directory's
    name; the path given is accepted too but never shown). `max_tokens` caps (and is the default
    of) a request's max_tokens; `api_key`, when set, is required as `Authorization: Bearer KEY`
    on /v1/*. `batch_invariant=False` lets the engine run only its busy rows (see
    infer/engine.py). `allowed_hosts`: the Host names answered (see guards.allowed_hosts; "*" =
    any); `request_timeout`: seconds for a request's body to arrive; `template_timeout`:
    seconds for the chat template to render. `embedding_model`: a directory (or an Embedder)
    that /v1/embeddings answers with; loaded here, so a bad one fails at start. `rag_indexes`:
    {name: index dir} a request's `retrieval` may name (serve/retrieval.py), opened here too.
    `memory`: drop, summary or retrieve, for a chat longer than the context (infer/memory.py;
    None: no fitting, as before). `redact_pii`: the answers' PII replaced by placeholders,
    streamed ones too (safety/redact.py). `moderation`: a serve/moderation.py Policy (the
    moderation model, what it screens, how it refuses); it also serves /v1/moderations.
    `injection_model`: a trained injection classifier (`lmforge injection train`) a request's
    `retrieval.defence` detects with beside the rules."""
    if min(max_batch, max_tokens, max_request_bytes) < 1 or max_queue < 0:
        raise ConfigError(
            "max_batch, max_tokens and max_request_bytes must be >= 1, max_queue >= 0"
        )
    if not (request_timeout > 0 and template_timeout > 0):
        raise ConfigError("request_timeout and template_timeout must be > 0 seconds")
    load, default_name, aliases = model_loader(model, device)
    embedder = embedding_model
    if isinstance(embedding_model, (str, Path)):
        embedder = Embedder(embedding_model, device=str(pick_device(device)))
    srv = Server(
        load,
        model_name or default_name or "lmforge",
        api_key,
        max_batch,
        max_queue,
        max_tokens,
        max_request_bytes,
        batch_invariant,
    )
    srv.aliases = aliases
    srv.rag = retrieval.open_indexes(rag_indexes or {}, str(pick_device(device)), embedder)
    srv.memory = memory and check_strategy(memory, "memory")
    srv.redact_pii = redact_pii
    srv.moderation = moderation
    srv.injection = retrieval.open_injection_model(injection_model, str(pick_device(device)))
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
        return APIError(e.status_code, str(e.detail), error_type(e.status_code)).response()

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

    def cards() -> list[dict]:  # the chat model, then the embedding model when there is one
        if embedder is None:
            return [model_card(srv)]
        embed = {"id": Path(embedder.path).name, "object": "model", "created": srv.created}
        return [model_card(srv), {**embed, "owned_by": "lmforge"}]

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model_info(name: str):
        if embedder is not None and name == Path(embedder.path).name:
            return cards()[1]
        srv.check_model(name)
        return model_card(srv)

    def absent(path: str, what: str, option: str) -> None:  # a route whose model was not given
        async def route():
            raise APIError(404, f"this server has no {what} model: start it with {option} DIR",
                           code="not_found")  # fmt: skip

        app.post(path, dependencies=[Depends(authorize)])(route)

    if embedder is not None:
        add_embedding_routes(app, srv, embedder, authorize)
    else:
        absent("/v1/embeddings", "embedding", "--embedding-model")
    if moderation is not None:
        add_moderation_routes(app, srv, moderation, authorize)
    else:
        absent("/v1/moderations", "moderation", "--moderation-model")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(http: Request):
        srv.ready()
        obj = await read_json(http, srv.max_bytes, srv.request_timeout)
        body = validate(ChatRequest, obj)
        refuse_not_implemented(obj, CHAT_NOT_IMPLEMENTED)
        check_tool_choice(body)
        confidence.check(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = srv.params(body, max_tokens, confidence.wants_logprobs(body))
        params.grammar = response_grammar(body.response_format)
        messages = [plain_message(m) for m in body.messages]
        if refused := await screen_input(
            srv, user_texts(messages), body, "chat.completion", "messages"
        ):
            return refused
        # tools: rendered unless tool_choice is "none"; a forced call is prefilled (its text
        # is the start of the answer the parser reads); one call at most: stop at its end
        tools, force = request_tools(body), forced_tool_call(body)
        prefill = force.prefill if force else ""
        if force and force.grammar:  # the call's grammar, not response_format's, holds it
            params.grammar = force.grammar
        if tools and not body.parallel_tool_calls:
            params.stop = [*params.stop, TOOL_CALL_CLOSE]

        rag, found, hits, held = None, [], [], []  # hits: those of `found` the last render kept
        defence = Defence.named(body.retrieval.defence, srv.injection) if body.retrieval else None
        if body.retrieval is not None:  # search off the event loop: it embeds the question
            rag, found, held = await asyncio.to_thread(
                retrieval.search, srv.rag, body.retrieval, messages, srv.injection
            )

        def render() -> list[int]:
            def ids(msgs: list[dict]) -> list[int]:
                return chat_prompt_ids(srv.tok, msgs, tools) + srv.tok.encode(prefill)

            if rag is None:
                return ids(messages)
            n_ctx = srv.ready().cfg.max_seq_len  # the sources may take half the context at least
            budget = n_ctx - min(params.max_tokens, n_ctx // 2)
            hits[:] = retrieval.fit(ids, messages, found, budget, defence)  # again after --memory
            return ids(retrieval.ground(messages, hits, defence))

        prompt_ids = await srv.render_prompt(render)
        fitted = srv.memory and await asyncio.to_thread(  # --memory: a too long conversation
            fit_request, srv.tok, srv.engine, messages, tools, len(prompt_ids), params.max_tokens,
            srv.memory,
        )  # fmt: skip
        if fitted:  # rendered again, under the template guard
            messages = fitted.messages
            prompt_ids = await srv.render_prompt(render)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        req, events = srv.submit(prompt_ids, params, rid, "messages")
        samples = confidence.submit_samples(srv, body, prompt_ids, params, req)
        extra = {"retrieval": retrieval.retrieval_field(rag, hits, held)} if rag else None

        def choice(text: str) -> dict:
            message, finish = {"role": "assistant", "content": text}, req.finish_reason
            if tools:
                message["content"], calls = parse_tool_calls(prefill + text)
                if calls:
                    message["tool_calls"] = calls
                    finish = "tool_calls" if finish == "stop" else finish
            return {
                "index": 0,
                "message": message,
                "logprobs": chat_logprobs(srv.tok, req, 0, len(req.output_ids))
                if body.logprobs
                else None,
                "finish_reason": finish,
            }

        def answered(text: str) -> dict:  # the response's extra fields once the answer is known
            out = {"retrieval": retrieval.retrieval_field(rag, hits, held, text)} if rag else {}
            return out | confidence.logprob_field(body, req)  # self_consistency: below

        parser = ToolCallParser() if tools else None
        chunks = functools.partial(
            chat_chunks, parser=parser, prefill=prefill, first=extra, last=answered,
            logprobs=body.logprobs,
        )  # fmt: skip
        try:
            out = await reply(
                http, srv, body, req, events, chunks, "chat.completion", choice, answered
            )
            if samples:  # never streamed (confidence.check)
                out.update(await confidence.sampled_field(http, req, samples))
        finally:
            confidence.cancel(samples)  # a no-op for finished samples
        if fitted:  # what became of the turns that fell out (docs/memory.md)
            out = out if isinstance(out, Response) else JSONResponse(out)
            out.headers["x-lmforge-memory"] = f"{srv.memory}; {fitted.describe()}"
        return out

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
        text = prompt if isinstance(prompt, str) else srv.tok.decode(prompt)
        if refused := await screen_input(srv, [text], body, "text_completion", "prompt"):
            return refused
        if isinstance(prompt, str):
            tok = srv.tok
            prompt = ([tok.bos_id] if tok.prepend_bos else []) + tok.encode(prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        req, events = srv.submit(prompt, params, rid, "prompt")

        def choice(text: str) -> dict:
            return {
                "text": text,
                "index": 0,
                "logprobs": text_logprobs(srv.tok, req, 0, len(req.output_ids), 0),
                "finish_reason": req.finish_reason,
            }

        return await reply(http, srv, body, req, events, text_chunks, "text_completion", choice)

    return app


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
    srv: Server = app.state.server
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
