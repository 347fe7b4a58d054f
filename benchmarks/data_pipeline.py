"""Throughput of `lmforge clean`: the whole pipeline with 1 and 2 workers, and each step alone.

Cleaning is CPU-bound pure Python and numpy, one document at a time, so the figure that matters is
MB of input text per second per core, and how close 2 workers come to twice 1. Per step, the same
documents go through each step alone in this process (normalize first; the others see normalized
text). With --peer-python pointing at an interpreter that has datatrove (Hugging Face's pipeline,
the one FineWeb was built with), its equivalent steps run on the same documents in a subprocess and
the table prints ours/theirs.

    python benchmarks/data_pipeline.py --max-mb 6 --repeats 3 --peer-python /tmp/dtenv/bin/python
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_json, print_table  # noqa: E402

from lmforge.config import CleanConfig, DataConfig, load_recipe  # noqa: E402
from lmforge.data import clean  # noqa: E402
from lmforge.data.readers import iter_documents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALL_STEPS = ["normalize", "language", "quality", "toxicity", "pii", "exact_dedup", "near_dedup"]

PEER = r"""
import json, sys, time
from datatrove.data import Document
from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature, MinhashConfig
texts = [json.loads(l)["text"] for l in open(sys.argv[1], encoding="utf-8")]
docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
out = {}
def timed(name, fn):
    t0 = time.perf_counter()
    for d in docs:
        fn(d)
    out[name] = time.perf_counter() - t0
ftfy = FTFYFormatter()
timed("normalize", lambda d: ftfy.format(d.text))
rep, qual = GopherRepetitionFilter(), GopherQualityFilter()
timed("quality", lambda d: rep.filter(d) is True and qual.filter(d))
pii = PIIFormatter()
timed("pii", lambda d: pii.format(d.text))
sig = MinhashDedupSignature(output_folder="/tmp/dt-unused", config=MinhashConfig())
def signature(d):
    shingles = sig.get_shingles(d.text)
    if shingles.size:  # datatrove's own run() skips documents shorter than one shingle
        sig.get_signature(shingles)
timed("near_dedup (signature)", signature)
print(json.dumps(out))
"""


def load_docs(recipe_path: str, max_mb: float) -> list[tuple[str, str, str]]:
    """(source, lang, text) from each of the recipe's sources in turn, an equal byte share each."""
    recipe = load_recipe(recipe_path, {})
    share = max_mb * 1e6 / len(recipe.data.sources)
    docs = []
    for src in recipe.data.sources:
        n = 0
        for text in iter_documents(src, recipe.base_dir):
            docs.append((src.name, src.lang, text))
            n += len(text.encode("utf-8"))
            if n >= share:
                break
    return docs


def write_corpus(docs, d: Path) -> DataConfig:
    """The documents as one jsonl.gz per source: the pipeline then reads exactly these."""
    by_source: dict[str, list] = {}
    for name, lang, text in docs:
        by_source.setdefault((name, lang), []).append(text)
    sources = []
    for (name, lang), texts in by_source.items():
        path = d / f"{name}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        sources.append({"name": name, "path": str(path), "lang": lang})
    (d / "all.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for _, _, t in docs)
    )
    return DataConfig(sources=sources)


def time_steps(texts: list[str], cfg: CleanConfig) -> dict[str, float]:
    """Seconds each step takes alone over all documents, in this process."""
    from lmforge.data.dedup import exact_key, minhash_signature, near_duplicate_clusters
    from lmforge.data.langid import detect_language
    from lmforge.data.pii import scrub_pii
    from lmforge.data.quality import normalize_text, quality_problem
    from lmforge.data.toxicity import toxicity_problem

    def timed(fn, xs):
        t0 = time.perf_counter()
        out = [fn(x) for x in xs]
        return time.perf_counter() - t0, out

    t = {}
    t["normalize"], normed = timed(lambda x: normalize_text(x, cfg), texts)
    normed = [x for x in normed if x]
    t["language"], _ = timed(detect_language, normed)
    t["quality"], _ = timed(lambda x: quality_problem(x, cfg), normed)
    t["toxicity"], _ = timed(lambda x: toxicity_problem(x, cfg), normed)
    t["pii"], _ = timed(lambda x: scrub_pii(x, cfg.pii_types), normed)
    t["exact_dedup"], _ = timed(exact_key, normed)
    sig = lambda x: minhash_signature(x, cfg.num_perm, cfg.shingle_size, cfg.seed)  # noqa: E731
    t["near_dedup (signature)"], sigs = timed(sig, normed)
    import numpy as np

    t0 = time.perf_counter()
    near_duplicate_clusters(
        list(range(len(sigs))), np.stack(sigs), cfg.dedup_threshold, cfg.num_perm, cfg.seed
    )
    t["near_dedup (LSH index)"] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes/tiny-cpu.yaml"))
    ap.add_argument("--max-mb", type=float, default=6.0, help="MB of text, shared by the sources")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-docs", type=int, default=500)
    ap.add_argument("--peer-python", help="a Python with datatrove installed (optional)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    docs = load_docs(args.recipe, args.max_mb)
    texts = [t for _, _, t in docs]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    cfg = CleanConfig(steps=ALL_STEPS, shard_docs=args.shard_docs)
    print(f"{len(texts):,} documents, {mb:.2f} MB, from {args.recipe}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_corpus(docs, tmp)

        # --- reading alone, then every step alone
        t0 = time.perf_counter()
        n_read = sum(1 for s in data.sources for _ in iter_documents(s, "."))
        t_read = time.perf_counter() - t0
        steps = [time_steps(texts, cfg) for _ in range(args.repeats)]
        step_s = {k: median([s[k] for s in steps]) for k in steps[0]}
        peer = {}
        if args.peer_python:
            script = tmp / "peer.py"
            script.write_text(PEER)
            runs = []
            for _ in range(args.repeats):
                r = subprocess.run(
                    [args.peer_python, str(script), str(tmp / "all.jsonl")],
                    capture_output=True,
                    text=True,
                    env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                )
                if r.returncode != 0:
                    print("peer failed:", r.stderr[-2000:])
                    break
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            if runs:
                peer = {k: median([x[k] for x in runs]) for k in runs[0]}

        # --- the whole pipeline, 1 and 2 workers
        whole = {}
        for workers in (1, 2):
            secs = []
            for rep in range(args.repeats):
                c = CleanConfig(steps=ALL_STEPS, shard_docs=args.shard_docs, num_workers=workers)
                t0 = time.perf_counter()
                report = clean.run(c, data, ".", tmp / f"out{workers}-{rep}", log=lambda *a: None)
                secs.append(time.perf_counter() - t0)
            whole[workers] = median(secs)

    rows = [["read + parse", f"{n_read:,} docs", mb / t_read, "", ""]]
    for k, s in step_s.items():
        p = peer.get(k)
        rows.append([k, "", mb / s, mb / p if p else "", f"{p / s:.2f}" if p else ""])
    for w, s in whole.items():
        rows.append([f"whole pipeline, {w} worker{'s' * (w > 1)}", "", mb / s, "", ""])
    print_table(["step", "", "ours MB/s", "datatrove MB/s", "ours/peer"], rows)
    print(
        f"2 workers / 1 worker: {whole[1] / whole[2]:.2f}x; kept {report['docs_out']:,} of "
        f"{report['docs_in']:,} documents"
    )
    env = environment(torch.device("cpu"), torch.float32)
    print_json(
        "data_pipeline",
        env,
        mb=round(mb, 3),
        docs=len(texts),
        step_mb_s={k: round(mb / s, 3) for k, s in step_s.items()},
        peer_mb_s={k: round(mb / s, 3) for k, s in peer.items()},
        whole_mb_s={w: round(mb / s, 3) for w, s in whole.items()},
    )


if __name__ == "__main__":
    main()
