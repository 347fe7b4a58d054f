"""Per-request retrieval for `lmforge serve`: `--rag NAME=INDEX` opens `lmforge rag` indexes
at start, and a chat request that names one (`"retrieval": {"index": NAME}`, the openai
client's `extra_body`) is answered from its top chunks, with the sources in the response.

The one idea: the server does what `lmforge rag ask` does, inside a conversation: the last user
message is searched (BM25, and dense + fused when the index has vectors, with the encoder it was
built with), the best chunks that fit the context become numbered sources in that message, and
the response carries `retrieval`: the index, the sources in `rag query --json` form and, once
the answer is known, the sources it cites as [n] and whether it abstained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.infer.embed import Embedder
from lmforge.infer.untrusted import Defence
from lmforge.rag.answer import abstains, citations, ground, hold_back
from lmforge.rag.run import NamedEmbedder
from lmforge.rag.search import Hit, Index
from lmforge.serve.protocol import APIError, RetrievalOption


@dataclass
class RagIndex:
    name: str
    index: Index
    embedder: NamedEmbedder | None  # the encoder the index was built with; None: BM25 only


def parse_specs(specs: list[str] | None) -> dict[str, str]:
    """`NAME=DIR` strings (the --rag option) as {name: dir}; a bad one is a ConfigError."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not (sep and name and path):
            raise ConfigError(f"--rag {spec!r}: expected NAME=INDEX_DIR")
        if name in out:
            raise ConfigError(f"--rag: the name {name!r} is given twice")
        out[name] = path
    return out


def open_indexes(specs: dict[str, str], device: str, shared: Embedder | None) -> dict:
    """{name: RagIndex}, each index opened and its encoder loaded now, so that a bad index fails
    at start. An index built with the server's --embedding-model shares that encoder."""
    out, encoders = {}, {}
    if shared is not None:
        where = str(Path(shared.path).resolve())
        encoders[where] = NamedEmbedder(shared, where)
    for name, path in specs.items():
        try:
            index = Index(path)
        except ConfigError as e:
            raise ConfigError(f"--rag {name}={path}: {e}") from None
        encoder = index.settings.get("encoder")
        if encoder is not None and encoder not in encoders:
            if not Path(encoder).is_dir():
                raise ConfigError(
                    f"--rag {name}={path}: the index was embedded with {encoder}, "
                    "which is not a directory here"
                )
            encoders[encoder] = NamedEmbedder(Embedder(encoder, device=device), encoder)
        out[name] = RagIndex(name, index, encoders.get(encoder) if encoder else None)
    return out


def _question(messages: list[dict]) -> str:
    users = [m for m in messages if m["role"] == "user"]
    if not users or not isinstance(users[-1]["content"], str) or not users[-1]["content"].strip():
        raise APIError(400, "retrieval needs a user message with text to search for",
                       param="messages")  # fmt: skip
    return users[-1]["content"]


def open_injection_model(path: str | None, device: str = "cpu"):
    """`serve --injection-model DIR`: the trained injection classifier a request's
    `retrieval.defence` detects with beside the rules (opened at start: a bad one fails there);
    None without the option."""
    if path is None:
        return None
    from lmforge.safety.injection_clf import InjectionClassifier

    try:
        return InjectionClassifier(path, device=device)
    except ConfigError as e:
        raise ConfigError(f"--injection-model: {e}") from None


def search(indexes: dict, option: RetrievalOption, messages: list[dict], classifier=None):
    """(the index name, its hits for the last user message, those the injection rules (or the
    server's classifier) held back)."""
    rag = indexes.get(option.index)
    if rag is None:
        known = ", ".join(sorted(indexes)) or "none: start the server with --rag NAME=INDEX"
        raise APIError(400, f"retrieval.index {option.index!r} is not configured ({known})",
                       param="retrieval.index", code="not_found")  # fmt: skip
    question = _question(messages)
    hits = rag.index.search(question, option.k, rag.embedder, option.min_bm25, option.min_dense)
    kept, held = hold_back(hits, Defence.named(option.defence, classifier))
    return rag.name, kept, held


def fit(render, messages: list[dict], hits: list[Hit], budget: int, defence: Defence) -> list[Hit]:
    """The best-ranked hits whose grounded conversation renders within `budget` tokens."""
    hits = list(hits)
    while hits and len(render(ground(messages, hits, defence))) > budget:
        hits.pop()
    return hits


def retrieval_field(name: str, hits: list[Hit], held: list[dict], text: str | None = None) -> dict:
    """The response's `retrieval`: the sources and those held back; with the answer's `text`,
    what it cites."""
    out = {"index": name, "sources": [h.as_dict() for h in hits], "held_back": held}
    if text is not None:
        out["abstained"] = abstains(text) or not hits
        out["citations"] = [] if out["abstained"] else citations(text, hits)[0]
    return out
