"""Tokenize the corpus into flat token shards that training reads with np.memmap.

The one idea: a shard is just the token ids of many documents, each written as
[bos] + tokens + [eos] (or the model's own separator: see document_markers), end to end in one raw uint16/uint32 array, with a `.idx.npy` of document
start offsets beside it. Validation documents (chosen by a hash of their text) go to one file per
language, so loss and bits per byte can be reported per language. Every file is written under a
temporary name and renamed when complete, and manifest.json is written last: a manifest on disk
always describes whole files.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.config import DataConfig
from lmforge.data.readers import DataError, is_val, iter_documents
from lmforge.tokenizer import Tokenizer

BATCH_DOCS = 256  # documents per worker task: big enough to hide pickling, small enough to stream


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page cache footprint whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- writing


class TokenFile:
    """Appends documents to one `.bin` (+ `.idx.npy`) under temporary names; `close()` renames.

    Until close() the final names do not exist, so a crash leaves only `.tmp-*` files behind."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype):
        self.out_dir, self.name, self.dtype = out_dir, name, dtype
        self.tmp = out_dir / f".{name}.bin.tmp-{os.getpid()}"
        self.f = open(self.tmp, "wb")
        self.starts: list[int] = []
        self.tokens = 0
        self.bytes = 0  # UTF-8 bytes of the documents' text, for bits per byte

    def write(self, ids: np.ndarray, n_bytes: int) -> None:
        self.starts.append(self.tokens)
        self.f.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += len(ids)
        self.bytes += n_bytes

    def close(self) -> dict:
        self.f.close()
        idx_tmp = self.out_dir / f".{self.name}.idx.npy.tmp-{os.getpid()}"
        with open(idx_tmp, "wb") as f:  # a file object: np.save would append .npy to a bare name
            np.save(f, np.asarray(self.starts, dtype=np.int64))
        os.replace(self.tmp, self.out_dir / f"{self.name}.bin")
        os.replace(idx_tmp, self.out_dir / f"{self.name}.idx.npy")
        return {"file": f"{self.name}.bin", "docs": len(self.starts), "tokens": self.tokens}

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- tokenizing in workers

_worker_tok = None


def _init_worker(tokenizer_dir: str) -> None:
    # each worker is a process of its own: rayon threads inside it would only fight the others
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_tok
    _worker_tok = Tokenizer.load(tokenizer_dir)


DOC_SEPARATOR = "<|endoftext|>"  # GPT-2's document separator, kept by Qwen2, SmolLM2, Phi, ...


def document_markers(tok) -> tuple[list[int], list[int]]:
    """The ids written before and after every document: the boundary the model was pretrained
    with. A model's chat EOS (<|im_end|>) is not its document boundary: tokenizers that have
    <|endoftext|> separated their pretraining documents with it. With a BOS of its own (ours,
    Llama) a document is [BOS] text [end]; with none, or a BOS that is the separator itself
    (SmolLM2, GPT-2, Qwen2), one separator goes before each document, which in a packed stream
    also ends the previous one."""
    sep = DOC_SEPARATOR if DOC_SEPARATOR in tok.special_tokens() else tok.eos_token
    end = tok.token_id(sep)
    if tok.prepend_bos and tok.bos_id != end:
        return [tok.bos_id], [end]
    return [end], []


def _encode(docs: list[str], tok=None) -> list[np.ndarray]:
    tok = tok or _worker_tok
    start, end = document_markers(tok)
    return [np.array([*start, *ids, *end], dtype=np.int64) for ids in tok.encode_batch(docs)]


def _batches(items: Iterator, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(
    batches: Iterator[list], tokenizer_dir: str, num_workers: int
) -> Iterator[tuple[list, list]]:
    """(batch, its token arrays) in input order. A bounded number of tasks is in flight, so memory
    stays constant (Pool.imap would read the whole corpus ahead into its task queue)."""
    if num_workers <= 1:  # in this process, where encode_batch may use its own threads
        tok = Tokenizer.load(tokenizer_dir)
        for batch in batches:
            yield batch, _encode([doc for *_, doc in batch], tok)
        return
    # fork on Linux (as torch's DataLoader does): workers start at once and a user's script needs
    # no `if __name__ == "__main__"` guard; they only run tokenizers and numpy, never torch.
    # Elsewhere fork is unsafe (macOS system libraries), so use the platform default, spawn.
    ctx = mp.get_context("fork" if sys.platform == "linux" else None)
    # set before forking: children must not use rayon threads (tokenizers warns, then disables)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_dir,))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode, ([doc for *_, doc in batch],))))
            if len(pending) >= 4 * num_workers:
                b, res = pending.popleft()
                yield b, res.get()
        while pending:
            b, res = pending.popleft()
            yield b, res.get()


# --------------------------------------------------------------------------- the stage


def _documents(cfg: DataConfig, base_dir: str) -> Iterator[tuple[int, bool, str]]:
    for i, src in enumerate(cfg.sources):
        for doc in iter_documents(src, base_dir):
            yield i, is_val(doc, cfg.val_fraction), doc


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


class ShardWriter:
    """Train shards of at most `shard_tokens` tokens each, cut at document boundaries."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.shard: TokenFile | None = None
        self.done: list[dict] = []

    def write(self, ids: np.ndarray, n_bytes: int) -> None:
        # a new shard starts at a document boundary; one huge document may exceed it
        if self.shard is not None and self.shard.tokens + len(ids) > self.shard_tokens:
            self.done.append(self.shard.close())
            self.shard = None
        if self.shard is None:
            self.shard = TokenFile(self.out_dir, f"train_{len(self.done):03d}", self.dtype)
        self.shard.write(ids, n_bytes)

    def close(self) -> list[dict]:
        if self.shard is not None:
            self.done.append(self.shard.close())
            self.shard = None
        return self.done

    def discard(self) -> None:
        if self.shard is not None:
            self.shard.discard()


def mixture_epochs(cfg: DataConfig, unique_tokens: list[int]) -> list[float]:
    """Times each source's training documents are written: its `epochs`, or, with weights, the
    epochs that give it its share of `train_tokens` (default: one pass over every source)."""
    if not any(s.weight for s in cfg.sources):
        return [s.epochs or 1.0 for s in cfg.sources]
    total = cfg.train_tokens or sum(unique_tokens)
    norm = sum(s.weight for s in cfg.sources)
    epochs = []
    for s, n in zip(cfg.sources, unique_tokens):
        if n == 0:
            raise DataError(f"data source {s.name!r} has weight {s.weight} but no training tokens")
        epochs.append(s.weight / norm * total / n)
    return epochs


def _copies(n_docs: int, epochs: float, source: int) -> list[np.ndarray]:
    """The documents of each pass over a source, in order: whole passes, then a fraction of the
    documents picked by an rng seeded by the source's index, so every run picks the same ones."""
    full, frac = int(epochs), epochs - int(epochs)
    passes = [np.arange(n_docs)] * full
    if frac > 1e-9:
        passes.append(np.flatnonzero(np.random.default_rng([source, full]).random(n_docs) < frac))
    return passes


def _mix(staged: list[TokenFile], doc_bytes: list[list[int]], epochs, shards: ShardWriter, stats):
    """Write the staged sources into the train shards: pass c of every source before pass c + 1,
    so the copies of a document land far apart. The staged files are memory-mapped."""
    passes, tokens = [], []
    for i, f in enumerate(staged):
        path = f.out_dir / f"{f.name}.bin"
        mm = np.memmap(path, dtype=f.dtype, mode="r") if path.stat().st_size else np.zeros(0)
        tokens.append((mm, np.append(np.asarray(f.starts, dtype=np.int64), len(mm))))
        passes.append(_copies(len(f.starts), epochs[i], i))
        stats[i]["mixture"] = {"epochs": epochs[i], "docs": 0, "tokens": 0, "bytes": 0}
    for c in range(max(len(p) for p in passes)):
        for i, p in enumerate(passes):
            if c >= len(p):
                continue
            (mm, starts), m = tokens[i], stats[i]["mixture"]
            for d in p[c]:
                ids = mm[starts[d] : starts[d + 1]]
                shards.write(ids, doc_bytes[i][d])
                m["docs"] += 1
                m["tokens"] += len(ids)
                m["bytes"] += doc_bytes[i][d]


def run(cfg: DataConfig, tokenizer_dir: str | Path, base_dir: str, out_dir: str | Path) -> dict:
    """The `prepare` stage: tokenize every source into train shards and per-language val files;
    returns the manifest (also written to out_dir/manifest.json).

    With a mixture (a source's `epochs` or `weight`), each source's training documents are first
    staged in a file of their own, then written into the shards as many times as its epochs say."""
    if not cfg.sources:
        raise DataError("data.sources is empty: nothing to prepare")
    tok = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # an old manifest would point at shards we are about to replace: it goes first
    (out_dir / "manifest.json").unlink(missing_ok=True)
    mixing = any(s.epochs or s.weight for s in cfg.sources)

    # --- per-source counters
    stats = [
        {
            "name": s.name,
            "lang": s.lang,
            "path": s.path,
            **{k: {"docs": 0, "tokens": 0, "chars": 0, "bytes": 0} for k in ("train", "val")},
        }
        for s in cfg.sources
    ]
    val_files: dict[str, TokenFile] = {}
    shards = ShardWriter(out_dir, dtype, cfg.shard_tokens)
    staged = (
        [TokenFile(out_dir, f".stage_{i:03d}", dtype) for i in range(len(stats))] if mixing else []
    )
    doc_bytes: list[list[int]] = [[] for _ in stats]

    # --- tokenize and write, in corpus order (the same shards whatever num_workers is)
    bar = tqdm(unit="doc", delay=2.0, desc="prepare")
    try:
        docs = _batches(_documents(cfg, base_dir), BATCH_DOCS)
        for batch, arrays in _encoded(docs, str(tokenizer_dir), cfg.num_workers):
            for (i, val, doc), ids in zip(batch, arrays):
                n_bytes = len(doc.encode("utf-8"))
                if val:
                    lang = cfg.sources[i].lang
                    if lang not in val_files:
                        val_files[lang] = TokenFile(out_dir, f"val_{lang}", dtype)
                    val_files[lang].write(ids, n_bytes)
                elif mixing:
                    staged[i].write(ids, n_bytes)
                    doc_bytes[i].append(n_bytes)
                else:
                    shards.write(ids, n_bytes)
                s = stats[i]["val" if val else "train"]
                s["docs"] += 1
                s["tokens"] += len(ids)
                s["chars"] += len(doc)
                s["bytes"] += n_bytes
            bar.update(len(batch))
            bar.set_postfix(tokens=sum(s["train"]["tokens"] + s["val"]["tokens"] for s in stats))
        if not any(s["train"]["docs"] for s in stats):
            names = ", ".join(f"{s.name} ({s.path})" for s in cfg.sources)
            raise DataError(f"no training documents in any source: {names}")
        if mixing:
            # --- the mixture: every source as many times as its epochs say
            for f in staged:
                f.close()
            epochs = mixture_epochs(cfg, [s["train"]["tokens"] for s in stats])
            _mix(staged, doc_bytes, epochs, shards, stats)
        train_shards = shards.close()
        val = {lang: {**f.close(), "bytes": f.bytes} for lang, f in sorted(val_files.items())}
    except BaseException:
        shards.discard()
        for f in [*val_files.values(), *staged]:
            f.discard()
        raise
    finally:
        bar.close()
        for f in staged:
            for suffix in (".bin", ".idx.npy"):
                (out_dir / f"{f.name}{suffix}").unlink(missing_ok=True)

    # --- files of an earlier, bigger run would confuse a reader of the folder
    keep = {e["file"] for e in train_shards} | {e["file"] for e in val.values()}
    for p in [*out_dir.glob("train_*"), *out_dir.glob("val_*")]:
        if p.name.replace(".idx.npy", ".bin") not in keep:
            p.unlink()

    manifest = {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "tokenizer_fingerprint": tok.fingerprint(),
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        # what surrounds each document (see document_markers)
        "doc_markers": dict(zip(("start", "end"), document_markers(tok))),
        "val_fraction": cfg.val_fraction,
        "sources": stats,
        "train_shards": train_shards,
        "val": val,
    }
    _write_json(out_dir / "manifest.json", manifest)
    return manifest


def realised_mixture(manifest: dict) -> list[dict]:
    """Per source: training tokens written, their share of all, and the epochs that makes."""
    rows = []
    for s in manifest["sources"]:
        m = s.get("mixture") or {"tokens": s["train"]["tokens"], "docs": s["train"]["docs"]}
        rows.append({"name": s["name"], "tokens": m["tokens"], "unique": s["train"]["tokens"]})
    total = sum(r["tokens"] for r in rows) or 1
    for r in rows:
        r["share"] = r["tokens"] / total
        r["epochs"] = r["tokens"] / r["unique"] if r["unique"] else 0.0
    return rows
