"""Moderation in the server: `/v1/moderations` in OpenAI's shape, and the screens that
`lmforge serve MODEL --moderation-model DIR --moderation in,out` puts around generation.

The one idea: input is screened before the prompt is rendered, output while it is generated,
and a streamed answer is released only after the moderator has read it. The answer's text is
held back until `every` new characters have arrived (or the answer ended), then the last
`window` characters are moderated; clean text goes out, flagged text never does: the request
is cancelled, the held-back text dropped, the deployment's refusal message sent as the last
piece, and the finish reason is `content_filter` (OpenAI's name for it). So a client never sees
more than the part of the answer that passed, and the stream still ends with a finish chunk and
`[DONE]`.

Input that is flagged is refused before the model runs: with action "error" (the default) as a
400 `content_policy_violation` in OpenAI's error shape, with action "refuse" as an ordinary
answer holding the refusal message, finish reason `content_filter`. The user's messages are
screened (a long one by its first and last `window` characters: the head reads 256 tokens);
the system prompt is the deployment's own and tool results or retrieved text go through the
injection defence instead (infer/untrusted.py).

The moderator is safety/moderation.py's Moderator (a frozen encoder and a small head), run off
the event loop; verdicts are cached by text, so a conversation's earlier turns cost nothing
the second time.
"""

import asyncio
import collections
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.safety.run import parse_where  # noqa: F401 (the serve side names it too)
from lmforge.serve.protocol import APIError, Strict, read_json, validate

ACTIONS = ("error", "refuse")
REFUSAL = "I can't help with that."
MAX_INPUTS = 32  # texts per /v1/moderations request: each is a forward pass of the encoder
CACHE_SIZE = 4096  # verdicts kept by text


@dataclass
class Policy:
    """What a deployment screens and how it refuses. `moderator`: a directory of
    `lmforge moderate train` or an object with `.moderate(texts)` and `.cfg["categories"]`.
    `categories`: refuse only when one of these is flagged (None: whenever the text is)."""

    moderator: object
    screen_in: bool = True
    screen_out: bool = True
    action: str = "error"
    message: str = REFUSAL
    categories: tuple[str, ...] | None = None
    every: int = 100  # characters of answer held back between two checks
    window: int = 1000  # characters the moderator reads (the head reads MAX_TOKENS tokens)
    name: str = "moderation"
    threshold: float | None = None  # the flagged cut; None: the model's own
    _cache: collections.OrderedDict = field(default_factory=collections.OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if isinstance(self.moderator, str | Path):
            from lmforge.safety.moderation import Moderator

            self.name = Path(self.moderator).resolve().name
            self.moderator = Moderator(self.moderator, threshold=self.threshold)
        if self.action not in ACTIONS:
            raise ConfigError(f"--moderation-action {self.action!r}: give one of {', '.join(ACTIONS)}")  # fmt: skip
        if not self.message.strip():
            raise ConfigError("--moderation-message: empty refusal message")
        if self.every < 1 or self.window < 1:
            raise ConfigError("moderation every and window must be >= 1 characters")
        known = list(self.moderator.cfg["categories"])
        unknown = [c for c in self.categories or () if c not in known]
        if unknown:
            raise ConfigError(f"--moderation-categories: unknown category {unknown[0]!r}; "
                              f"{self.name} knows {', '.join(known)}")  # fmt: skip

    @property
    def known(self) -> list[str]:
        return list(self.moderator.cfg["categories"])

    def results(self, texts: list[str]) -> list[dict]:
        """The moderator's result per text (Moderator.moderate's dicts), cached by text.
        Blocking: call it off the event loop."""
        with self._lock:
            have = {t: self._cache[t] for t in texts if t in self._cache}
        todo = [t for t in dict.fromkeys(texts) if t not in have]
        if todo:
            have.update(zip(todo, self.moderator.moderate(todo), strict=True))
            with self._lock:
                for t in todo:
                    self._cache[t] = have[t]
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return [have[t] for t in texts]

    def blocks(self, result: dict) -> bool:
        """Whether a result is refused under this deployment's categories."""
        if not result["flagged"]:
            return False
        return self.categories is None or any(c in self.categories for c in result["categories"])

    def windows(self, text: str) -> list[str]:
        """What the moderator reads of a text: all of it, or its first and last window."""
        if len(text) <= self.window:
            return [text]
        return [text[: self.window], text[-self.window :]]

    async def first_blocked(self, texts: list[str]) -> dict | None:
        """The result of the first window refused among `texts`, or None."""
        parts = [w for t in texts if t.strip() for w in self.windows(t)]
        if not parts:
            return None
        results = await asyncio.to_thread(self.results, parts)
        return next((r for r in results if self.blocks(r)), None)

    def output_screen(self) -> "OutputScreen | None":
        return OutputScreen(self) if self.screen_out else None


def describe(result: dict) -> str:
    """ "harmful_request 0.97" style: what tripped, for the error message and the header."""
    cats = result["categories"] or ["flagged"]
    scores = result["category_scores"]
    return ", ".join(f"{c} {scores.get(c, result['score']):.2f}" for c in cats)


class OutputScreen:
    """One answer's screen: `await feed(piece, done)` returns the text cleared for the client
    (possibly ""), and sets `tripped` (with `result`) when the moderator flags the answer."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.text, self.sent, self.checked = "", 0, 0
        self.tripped, self.result = False, None

    async def feed(self, piece: str, done: bool) -> str:
        self.text += piece
        if self.tripped or (not done and len(self.text) - self.checked < self.policy.every):
            return ""
        self.checked = len(self.text)
        tail = self.text[-self.policy.window :]
        if tail.strip():
            (result,) = await asyncio.to_thread(self.policy.results, [tail])
            if self.policy.blocks(result):
                self.tripped, self.result = True, result
                return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


# --------------------------------------------------------------------------- input


def user_texts(messages: list[dict]) -> list[str]:
    """The text the user wrote: the content of every user message."""
    return [m["content"] for m in messages if m["role"] == "user" and m.get("content")]


async def screen_input(srv, texts: list[str], body, kind: str, param: str):
    """None when the input passes (or input is not screened); else raises the 400, or returns
    the refusal response (action "refuse")."""
    policy = srv.moderation
    if policy is None or not policy.screen_in:
        return None
    result = await policy.first_blocked(texts)
    if result is None:
        return None
    if policy.action == "error":
        raise APIError(400, f"the input was flagged by moderation ({describe(result)}); this "
                       "server does not answer it", param=param, code="content_policy_violation",
                       headers={"x-lmforge-moderation": f"input; {describe(result)}"})  # fmt: skip
    return refusal(srv, body, kind, policy.message, f"input; {describe(result)}")


def refusal(srv, body, kind: str, message: str, why: str):
    """An answer that is the refusal message, never generated: whole or as a stream."""
    from fastapi.responses import JSONResponse, StreamingResponse

    rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
    created, usage = int(time.time()), {"prompt_tokens": 0, "completion_tokens": 0,
                                        "total_tokens": 0}  # fmt: skip
    headers = {"x-lmforge-moderation": why}

    def choice(text: str, finish, stream: bool) -> dict:
        if kind == "text_completion":
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        if stream:
            delta = {"role": "assistant", "content": text} if text else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}

    def obj(kind_: str, choices: list, **extra) -> dict:
        out = {"id": rid, "object": kind_, "created": created, "model": srv.model_name}
        return {**out, "choices": choices, **extra}

    if not body.stream:
        return JSONResponse(obj(kind, [choice(message, "content_filter", False)], usage=usage),
                            headers=headers)  # fmt: skip
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def sse(o: dict) -> str:
        return f"data: {json.dumps(o, ensure_ascii=False)}\n\n"

    async def events():
        with_usage = {"usage": None} if include_usage else {}
        yield sse(obj(chunk_kind, [choice(message, None, True)], **with_usage))
        yield sse(obj(chunk_kind, [choice("", "content_filter", True)], **with_usage))
        if include_usage:
            yield sse(obj(chunk_kind, [], usage=usage))
        yield "data: [DONE]\n\n"

    headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# --------------------------------------------------------------------------- /v1/moderations


class TextPart(Strict):
    type: str
    text: str | None = None


class ModerationRequest(Strict):
    model: str | None = None  # optional: there is one moderation model
    input: str | list[str] | list[TextPart]


def _inputs(body: ModerationRequest) -> list[str]:
    x = body.input
    if isinstance(x, str):
        x = [x]
    if not x:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    if not isinstance(x[0], str):  # OpenAI's multi-modal form: only text parts here
        bad = next((p.type for p in x if p.type != "text" or p.text is None), None)
        if bad is not None:
            raise APIError(400, f"input part of type {bad!r} is not supported: this moderation "
                           "model reads text only", param="input", code="invalid_value")  # fmt: skip
        x = [p.text for p in x]
    if len(x) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request, got {len(x)}",
                       param="input", code="invalid_value")  # fmt: skip
    return x


def add_moderation_routes(app, srv, policy: Policy, authorize) -> None:
    """Register POST /v1/moderations on `app`: OpenAI's response shape, {"id", "model",
    "results": [{"flagged", "categories": {name: bool}, "category_scores": {name: float}}]}.
    `flagged` is the model's own verdict; the deployment's --moderation-categories only decide
    what serving refuses."""
    from fastapi import Depends, Request

    from lmforge.safety.moderation import check_text

    @app.post("/v1/moderations", dependencies=[Depends(authorize)])
    async def moderations(http: Request):
        obj = await read_json(http, srv.max_bytes, srv.request_timeout)
        body = validate(ModerationRequest, obj)
        if body.model is not None and body.model != policy.name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server moderates "
                           f"with {policy.name!r}", param="model", code="model_not_found")  # fmt: skip
        texts = _inputs(body)
        for i, t in enumerate(texts):
            try:
                check_text(t, f"input {i + 1}")
            except ConfigError as e:
                raise APIError(400, str(e), param="input", code="invalid_value") from None
        parts = [policy.windows(t) for t in texts]
        flat = await asyncio.to_thread(policy.results, [w for p in parts for w in p])
        results, i = [], 0
        for p in parts:  # a long text: the worse of its first and last window
            rs, i = flat[i : i + len(p)], i + len(p)
            worst = max(rs, key=lambda r: (r["flagged"], r["score"]))
            scores = {c: max(r["category_scores"][c] for r in rs) for c in policy.known}
            cats = {c: c in worst["categories"] for c in policy.known}
            results.append({"flagged": worst["flagged"], "categories": cats,
                            "category_scores": scores})  # fmt: skip
        return {"id": f"modr-{uuid.uuid4().hex}", "model": policy.name, "results": results}
