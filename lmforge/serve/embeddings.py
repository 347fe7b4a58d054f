"""`/v1/embeddings`: OpenAI's embeddings endpoint over an Embedder given at start.

The one idea: embedding is one batched forward pass with no decoding, so it does not go through
the generation engine's slots; a request is embedded whole, off the event loop, one request at
a time (a lock: two would only share the same CPU threads). The embedding model is separate
from the chat model (`lmforge serve MODEL --embedding-model DIR`) because good sentence vectors
come from an encoder trained for them (all-MiniLM-L6-v2), not from a chat model's states.

OpenAI's shape: `input` a string, a list of strings, a list of token ids or a list of such
lists (ids are read as given: no [CLS]/[SEP] added); `encoding_format` "float" or "base64"
(little-endian float32 bytes, what the openai client asks for by default); `dimensions` only at
the model's own width (400 otherwise: these models are not trained to be truncated).
"""

import asyncio
import base64
from pathlib import Path
from typing import Literal

from lmforge.config import ConfigError

# Field is pydantic's, through protocol: it names the missing extra when the web stack is absent
from lmforge.serve.protocol import APIError, Field, Strict, read_json, validate

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(Strict):
    model: str | None = None  # optional: there is one embedding model
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1, le=256)  # extension: rows per forward pass


def _inputs(body: EmbeddingRequest) -> tuple[list, bool]:
    """(inputs, are_ids): a single string or id list becomes a list of one."""
    x = body.input
    if isinstance(x, str) or (x and isinstance(x[0], int)):
        x = [x]
    if not x:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    if len(x) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request, got {len(x)}",
                       param="input", code="invalid_value")  # fmt: skip
    are_ids = not isinstance(x[0], str)
    if not are_ids and any(s == "" for s in x):
        raise APIError(400, "input holds an empty string", param="input", code="invalid_value")
    return x, are_ids


def _encode(vec, fmt: str):
    if fmt == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return vec.tolist()


def add_embedding_routes(app, srv, embedder, authorize) -> None:
    """Register POST /v1/embeddings on `app` (authorize: the app's API-key dependency)."""
    # the app exists, so the web stack is installed; no `from __future__ import annotations`
    # in this module, so FastAPI sees `Request` itself in the route's signature
    from fastapi import Depends, Request

    name = Path(embedder.path).name
    lock = asyncio.Lock()

    def run(body: EmbeddingRequest, inputs: list, are_ids: bool):
        seqs = inputs if are_ids else embedder.tokenize(inputs)
        try:
            vectors = embedder.embed_ids(seqs, batch_size=body.batch_size)
        except ConfigError as e:  # an id list too long or empty
            raise APIError(400, str(e), param="input", code="invalid_value") from None
        return vectors, sum(len(s) for s in seqs)

    @app.post("/v1/embeddings", dependencies=[Depends(authorize)])
    async def embeddings(http: Request):
        obj = await read_json(http, srv.max_bytes, srv.request_timeout)
        body = validate(EmbeddingRequest, obj)
        if body.model is not None and body.model not in (name, str(embedder.path)):
            raise APIError(404, f"the model {body.model!r} does not exist; this server embeds "
                           f"with {name!r}", param="model", code="model_not_found")  # fmt: skip
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise APIError(400, f"dimensions {body.dimensions} is not supported: {name} gives "
                           f"{embedder.dim}-dimensional vectors only", param="dimensions",
                           code="invalid_value")  # fmt: skip
        inputs, are_ids = _inputs(body)
        if are_ids:
            vocab = embedder.vocab_size
            if any(not 0 <= t < vocab for s in inputs for t in s):
                raise APIError(400, f"a token id is outside the vocabulary [0, {vocab})",
                               param="input", code="invalid_value")  # fmt: skip
        async with lock:
            vectors, n_tokens = await asyncio.to_thread(run, body, inputs, are_ids)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]  # fmt: skip
        usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return {"object": "list", "data": data, "model": name, "usage": usage}
