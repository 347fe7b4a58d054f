"""Sentence-embedding throughput: lmforge's `Embedder` vs. sentence-transformers' `encode` on
all-MiniLM-L6-v2, the same texts and batch size, in one process.

Regime: embedding a corpus for retrieval on a CPU. Unlike decoding, every token of a batch goes
through the encoder in one pass, so this is compute-bound (matmuls of batch x length x width);
what differs between the two sides is padding (both sort by length) and per-batch overhead.
Tokens/s counts real tokens (the [CLS] ... [SEP] ids each side reads, truncated at 256), not
padding. Sentences are the first paragraphs of the bundled enwiki and zhwiki samples; each side
runs `--repeats` times, alternating, and the median is reported. The largest difference between
the two sides' vectors is printed too (the parity the tests pin at 1e-5).

    python benchmarks/embed.py                      # 2 threads, 256 + 64 texts, batch 32
    python benchmarks/embed.py --threads 1 --texts 256 --repeats 5
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import environment, median, print_json, print_table, quiet_transformers

from lmforge.fetch import cached_model
from lmforge.infer.embed import Embedder

DATA = Path(__file__).resolve().parent.parent / "datasets"


def corpus(n: int) -> list[str]:
    """Up to n/2 English and n/2 Chinese texts, each a document's first paragraph (the zhwiki
    sample has 64 documents: the default 512 gives 256 + 64)."""
    out = []
    for file in ("enwiki/enwiki_extract_train_head6000.jsonl.gz", "chinese/zhwiki_sample.jsonl.gz"):
        with gzip.open(DATA / file, "rt", encoding="utf-8") as f:
            got = 0
            for line in f:
                para = json.loads(line)["text"].strip().split("\n")[0]
                if para:
                    out.append(para)
                    got += 1
                if got == n // 2:
                    break
    return out


def timed(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    from sentence_transformers import SentenceTransformer

    model_dir = cached_model("all-minilm-l6-v2")
    assert model_dir is not None, "run `lmforge fetch all-minilm-l6-v2` first"
    texts = corpus(args.texts)
    ours = Embedder(model_dir)
    theirs = SentenceTransformer(str(model_dir), device="cpu")
    tokens = sum(len(ids) for ids in ours.tokenize(texts))
    sides = {
        "lmforge Embedder": lambda: ours.embed(texts, batch_size=args.batch_size),
        "sentence-transformers": lambda: theirs.encode(texts, batch_size=args.batch_size),
    }
    for fn in sides.values():  # warm-up: allocator, thread pool
        fn()
    seconds = {name: [] for name in sides}
    vectors = {}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            t, vectors[name] = timed(fn)
            seconds[name].append(t)
    rows = [
        [name, len(texts), tokens, median(s), tokens / median(s)] for name, s in seconds.items()
    ]
    print_table(["side", "texts", "tokens", "seconds", "tokens/s"], rows)
    diff = float(np.abs(vectors["lmforge Embedder"] - vectors["sentence-transformers"]).max())
    print(f"max |ours - sentence-transformers| over {len(texts)} x {ours.dim}: {diff:.2e}")
    env = environment(torch.device("cpu"), torch.float32)
    print_json("embed", env, threads=args.threads, texts=len(texts), tokens=tokens,
               batch_size=args.batch_size, max_abs_diff=diff,
               **{f"{k} tokens/s": round(tokens / median(s)) for k, s in seconds.items()})  # fmt: skip


if __name__ == "__main__":
    main()
