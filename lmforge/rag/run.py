"""The `lmforge rag` subcommands: index, query and ask (the CLI parses, these print)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.config import ConfigError
from lmforge.infer.embed import Embedder
from lmforge.infer.untrusted import Defence


class NamedEmbedder:
    """An encoder with the `name` the index records (its resolved directory unless it names
    itself), and its tokenizer's count for chunking when it has one."""

    def __init__(self, embedder, name: str):
        self.embedder = embedder
        self.name = getattr(embedder, "name", None) or name
        if hasattr(embedder, "count_tokens"):
            self.count_tokens = embedder.count_tokens

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(texts)


def load_embedder(path: str | None):
    """The sentence encoder in `path` (lmforge.infer.embed.Embedder), or None."""
    if path is None:
        return None
    if not Path(path).is_dir():
        raise ConfigError(f"--encoder {path}: not a directory")
    return NamedEmbedder(Embedder(path), str(Path(path).resolve()))


def cmd_index(args) -> int:
    from lmforge.rag.index import build_index

    s = build_index(args.docs, args.out, load_embedder(args.encoder), args.max_tokens, args.overlap)
    print(
        f"{args.out}: {s.docs} documents, {s.chunks} chunks "
        f"({s.added} added, {s.updated} updated, {s.deleted} deleted, {s.unchanged} unchanged)"
    )
    return 0


def _search(args, embedder):
    from lmforge.rag.search import Index

    return Index(args.index).search(args.query, args.k, embedder, args.min_bm25, args.min_dense)


def cmd_query(args) -> int:
    hits = _search(args, load_embedder(args.encoder))
    if args.json:
        print(
            json.dumps(
                {"query": args.query, "chunks": [h.as_dict() for h in hits]}, ensure_ascii=False
            )
        )
        return 0
    if not hits:
        print("no chunk passes the score threshold")
    for h in hits:
        scores = f"bm25 {h.bm25}  dense {h.dense}  fused {h.fused}"
        print(f"[{h.rank}] {h.doc_id} ({h.title}) chars {h.start}-{h.end}  {scores}")
        print("    " + h.text[:300].replace("\n", " ") + ("..." if len(h.text) > 300 else ""))
    return 0


def cmd_ask(args, defence: Defence | None = None) -> int:
    from lmforge.model.load import load
    from lmforge.perf import pick_device
    from lmforge.rag.answer import ask

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    hits = _search(args, load_embedder(args.encoder))
    # nothing retrieved: the answer is NO_ANSWER without loading the model
    model, tok = load(args.model, device=pick_device(args.device)) if hits else (None, None)
    defence = Defence.named(args.defence) if defence is None else defence
    out = ask(model, tok, args.query, hits, args.max_new_tokens, defence)
    if args.json:
        print(json.dumps({"query": args.query, **out}, ensure_ascii=False))
        return 0
    print(out["answer"])
    for h in out["held_back"]:
        print(f"held back: {h['doc_id']} chars {h['start']}-{h['end']} ({', '.join(h['rules'])})")
    for c in out["citations"]:
        print(f"[{c['n']}] {c['doc_id']} ({c['title']}) chars {c['start']}-{c['end']}")
    return 0
