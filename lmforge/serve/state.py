"""What `lmforge serve` holds between HTTP and the engine: the model loaded in the background,
the engine and the server's limits, a checked request turned into the engine's SamplingParams,
and the inbox through which the engine thread hands each request its text.

The one idea: the engine decodes every request in one background thread and calls back with
each text piece; the callback drops the piece into that request's inbox and wakes the event
loop through `loop.call_soon_threadsafe` (once, however many pieces arrive meanwhile), so an
HTTP request is a coroutine awaiting its inbox while one thread keeps all of them in one batch.
A request whose client goes away is cancelled, which frees its slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.infer.chat import stop_ids
from lmforge.infer.constrain import prepare
from lmforge.infer.engine import Engine, QueueFull, SamplingParams
from lmforge.model.load import load
from lmforge.perf import pick_device
from lmforge.serve import guards
from lmforge.serve.guards import RenderBusy, RenderTimeout, TemplateRenderer
from lmforge.serve.protocol import APIError, ChatRequest, Sampling, refuse_unsupported

log = logging.getLogger("lmforge.serve")
POLL_S = 0.5  # how often a waiting request checks whether its client is still there
SAMPLING_EPS = 1e-5  # temperatures below this are greedy (dividing logits by ~0 overflows)


def model_loader(model, device: str) -> tuple[Callable[[], tuple], str | None, set[str]]:
    """What create_app's `model` names (a model or adapter directory, a (model, tokenizer)
    pair, or a function returning one) as (a function returning (model, tokenizer), the
    model's default name or None, other names clients may use for it)."""
    if isinstance(model, str | Path):
        path = Path(model)
        if not path.is_dir():
            raise ConfigError(f"{path} is not a model or adapter directory")

        def load_dir():
            return load(path, device=pick_device(device))

        # the directory's name, not its path: /v1/models must not tell clients our file layout;
        # clients configured with the path keep working
        return load_dir, path.resolve().name, {str(model), str(path)}
    if isinstance(model, tuple | list):
        pair = tuple(model)
        return (lambda: pair), None, set()
    return model, None, set()


# --------------------------------------------------------------------------- the server


class Server:
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
        self.redact_pii = False  # answers pass through safety/redact.py
        self.moderation = None  # a serve/moderation.py Policy: screens input and output
        self.bind("127.0.0.1")

    def bind(self, host: str) -> None:
        """The address the server listens on decides the default Host names (DNS rebinding)."""
        self.host = host
        self.allowed_hosts = guards.allowed_hosts(host, self.allowed_hosts_arg)

    async def load(self) -> None:
        try:
            model, tok = await asyncio.to_thread(self._load)
            # grammars (response_format, forced tool calls) then cost nothing extra at first use
            await asyncio.to_thread(prepare, tok, model.cfg.vocab_size, stop_ids(tok))
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
        if not self.engine.is_alive():
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

    async def render_prompt(self, render: Callable[[], list[int]]) -> list[int]:
        """The chat template rendered off the event loop, under self.render's time limit: a
        template is code from the model's files, and one that loops must cost only its request."""
        try:
            return await self.render(render)
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

    def params(self, body: Sampling, max_tokens: int | None, logprobs: bool) -> SamplingParams:
        self.check_model(body.model)
        refuse_unsupported(body)
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise APIError(
                400,
                f"max_tokens is {max_tokens} but this server allows at most {self.max_tokens}",
                param="max_tokens",
            )
        if logprobs and self.redact_pii:  # each token's text would give the redacted span away
            raise APIError(400, "logprobs are not served with --redact-pii", param="logprobs")
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

    def submit(self, prompt_ids: list[int], params: SamplingParams, rid: str, param: str):
        """Queue a request; returns (engine request, the inbox of its events)."""
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
        events = Inbox(self.loop)
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


# --------------------------------------------------------------------------- a request's inbox


class Inbox:
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


async def request_events(http, req, events: Inbox) -> AsyncIterator[tuple]:
    """(piece, done, n_tokens) events until done, pieces already waiting merged into one. If
    the client goes away (a disconnect seen on the HTTP request `http`, or the streaming
    response cancelling us) the request is cancelled, freeing its slot."""
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
