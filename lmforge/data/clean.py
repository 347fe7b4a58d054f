"""`lmforge clean`: raw documents -> cleaned, filtered, deduplicated JSONL/parquet shards.

The one idea: the corpus is cut into shards of `shard_docs` documents (a range of one file), and
everything that can be decided one document at a time (normalize, language, quality, toxicity,
pii) runs on the shards in parallel, each worker writing its shard and a stats file atomically.
Only deduplication needs the whole corpus: workers also store each kept document's exact-match key
and MinHash signature, the driver finds duplicates over all of them (the first copy in corpus order
is kept), and a last parallel pass drops them. A killed run resumes: finished shards are not redone.

    OUT/clean/<source>/part-00000.jsonl.gz   the cleaned documents: {"id", "source", "lang", "text"}
    OUT/clean/report.json, report.md         per step: documents and bytes in, kept, removed and why
    OUT/clean/.work/                         per-shard stats and dedup keys while the run is going
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.config import CleanConfig, DataConfig, SourceConfig
from lmforge.data.executor import map_tasks, session
from lmforge.data.readers import DataError, source_files, source_units, unit_documents
from lmforge.io import read_json, write_json

DOC_STEPS = ("normalize", "language", "quality", "toxicity", "pii")
DEDUP_STEPS = ("exact_dedup", "near_dedup")
MAX_PROBLEMS = 100  # unreadable lines quoted per shard (all are counted)
SNIPPET = 200  # characters of a removed document quoted in the report


# --------------------------------------------------------------------------- planning


def _ignore(_error) -> None:
    pass


def plan_shards(cfg: CleanConfig, data: DataConfig, base_dir: str) -> list[dict]:
    """Every shard as a task: a source, one unit of its files, and a range of its documents.

    Counting reads the corpus once (cheap next to cleaning it); without skip_bad_rows the first
    unreadable line stops the run here, before anything is written."""
    on_error = _ignore if cfg.skip_bad_rows else None
    tasks = []
    for src in data.sources:
        units = source_units(source_files(src, base_dir), src)
        n_src = 0
        part = 0
        for unit in units:
            n = sum(1 for doc in unit_documents(unit, src, on_error) if doc.strip())
            if src.max_docs:
                n = min(n, src.max_docs - n_src)
            for start in range(0, max(n, 1), cfg.shard_docs):
                tasks.append(
                    dict(
                        src=src,
                        unit=[str(p) for p in unit],
                        start=start,
                        stop=min(start + cfg.shard_docs, n),
                        last=start + cfg.shard_docs >= n,  # reads to the end: trailing problems
                        first_id=n_src + start,
                        name=f"{src.name}/part-{part:05d}",
                    )
                )
                part += 1
            n_src += n
            if src.max_docs and n_src >= src.max_docs:
                break
    return tasks


def _plan_hash(cfg: CleanConfig, tasks: list[dict]) -> str:
    files = sorted({p for t in tasks for p in t["unit"]})
    stamp = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]
    plan = [(dataclasses.asdict(t["src"]), t["start"], t["stop"]) for t in tasks]
    # how the shards are run does not change what they hold: a killed run may resume on more workers
    runtime = ("num_workers", "executor", "ray_address")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in runtime}
    blob = json.dumps([settings, plan, stamp], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- per-document steps


def _doc_steps(cfg: CleanConfig) -> list[tuple[str, object]]:
    """(name, step) in recipe order; a step may rewrite doc["text"] and returns the reason it
    removes the document, or None to keep it."""
    steps = []
    for name in cfg.steps:
        if name == "normalize":
            from lmforge.data.quality import normalize_text

            def step(doc, stats, f=normalize_text):
                doc["text"] = f(doc["text"], cfg)
                return None if doc["text"] else "empty"
        elif name == "language":
            from lmforge.data.langid import detect_language

            def step(doc, stats, f=detect_language):
                lang, score = f(doc["text"])
                doc["lang"] = lang if score >= cfg.min_lang_score else "unknown"
                stats["counts"][doc["lang"]] += 1
                if cfg.languages and doc["lang"] not in cfg.languages:
                    return f"language_{doc['lang']}"
                return None
        elif name == "quality":
            from lmforge.data.quality import quality_problem

            def step(doc, stats, f=quality_problem, tagged="language" in cfg.steps):
                return f(doc["text"], cfg, doc["lang"] if tagged else None)
        elif name == "toxicity":
            from lmforge.data.toxicity import toxicity_problem

            def step(doc, stats, f=toxicity_problem, tagged="language" in cfg.steps):
                return f(doc["text"], cfg, doc["lang"] if tagged else None)
        elif name == "pii":
            from lmforge.data.pii import scrub_pii

            def step(doc, stats, f=scrub_pii):
                doc["text"], counts = f(doc["text"], cfg.pii_types)
                stats["counts"].update(counts)
                return None
        else:
            continue  # dedup steps run over the whole corpus, after these
        steps.append((name, step))
    return steps


def _new_stats() -> dict:
    return {
        "docs_in": 0,
        "bytes_in": 0,
        "docs_kept": 0,
        "bytes_kept": 0,
        "changed": 0,  # kept documents whose text the step rewrote
        "removed": Counter(),
        "examples": {},
        "counts": Counter(),  # what the step found: languages, PII by type
    }


def _snippet(doc: dict) -> dict:
    text = doc["text"]
    return {"id": doc["id"], "text": text[:SNIPPET] + ("…" if len(text) > SNIPPET else "")}


# --------------------------------------------------------------------------- shard files


def _write_docs(path: Path, docs: list[dict], fmt: str) -> None:
    """Write documents under a temporary name, then rename: a shard file is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols = {k: [d[k] for d in docs] for k in ("id", "source", "lang", "text")}
            pq.write_table(pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()}), tmp)
        else:
            # mtime=0 and no name in the header: the same documents give the same bytes
            with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", 6, raw, mtime=0) as f:
                for d in docs:
                    f.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_docs(path: Path, fmt: str) -> list[dict]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _ext(fmt: str) -> str:
    return ".parquet" if fmt == "parquet" else ".jsonl.gz"


# --------------------------------------------------------------------------- stage 1: shards


def clean_shard(task: dict) -> dict:
    """Run the per-document steps over one shard (in a worker); returns its stats, which are also
    the shard's done-marker on disk."""
    cfg: CleanConfig = task["cfg"]
    src: SourceConfig = task["src"]
    work = Path(task["work"])
    stats_path = work / f"{task['name']}.stats.json"
    if stats_path.exists():
        return read_json(stats_path, "shard stats")  # finished by an earlier, killed run
    stats_path.parent.mkdir(parents=True, exist_ok=True)

    steps = _doc_steps(cfg)
    per_step = {name: _new_stats() for name, _ in steps}
    problems: list[str] = []
    n_problems = 0
    seen = 0  # documents read so far in this unit

    def on_error(e: DataError) -> None:
        nonlocal n_problems
        # every shard of a unit reads past the same bad lines: report each in one shard only
        if task["start"] <= seen < task["stop"] or (task["last"] and seen >= task["stop"]):
            n_problems += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(str(e))

    kept: list[dict] = []
    docs_in = bytes_in = 0
    raw_docs = unit_documents(
        [Path(p) for p in task["unit"]], src, on_error if cfg.skip_bad_rows else None
    )
    for raw in raw_docs:
        text = raw.strip()
        if not text:
            continue
        if seen >= task["stop"]:
            if not task["last"]:
                break
            continue  # the unit's last shard reads on, for trailing problems only
        seen += 1
        if seen <= task["start"]:
            continue
        doc = {
            "id": f"{src.name}-{task['first_id'] + seen - 1 - task['start']}",
            "source": src.name,
            "lang": src.lang,
            "text": text,
        }
        n_bytes = len(text.encode("utf-8"))
        docs_in += 1
        bytes_in += n_bytes
        for name, step in steps:
            st = per_step[name]
            before = doc["text"]
            st["docs_in"] += 1
            st["bytes_in"] += n_bytes
            reason = step(doc, st)
            if reason:
                st["removed"][reason] += 1
                ex = st["examples"].setdefault(reason, [])
                if len(ex) < cfg.examples:
                    ex.append(_snippet(dict(doc, text=before)))
                break
            if doc["text"] != before:
                st["changed"] += 1
                n_bytes = len(doc["text"].encode("utf-8"))
            st["docs_kept"] += 1
            st["bytes_kept"] += n_bytes
        else:
            kept.append(doc)

    # --- keys for the corpus-wide dedup, then the shard, then the stats (the done-marker)
    if any(s in cfg.steps for s in DEDUP_STEPS):
        _write_dedup_keys(work / f"{task['name']}.dedup.npz", kept, cfg)
    _write_docs(work / (task["name"] + _ext(cfg.output_format)), kept, cfg.output_format)
    result = {
        "name": task["name"],
        "source": src.name,
        "docs_in": docs_in,
        "bytes_in": bytes_in,
        "docs_out": len(kept),
        "bytes_out": sum(len(d["text"].encode("utf-8")) for d in kept),
        "steps": per_step,
        "problems": problems,
        "n_problems": n_problems,
    }
    write_json(stats_path, result)
    return json.loads(json.dumps(result))  # Counters as dicts, the same as when read back


def _write_dedup_keys(path: Path, kept: list[dict], cfg: CleanConfig) -> None:
    from lmforge.data.dedup import exact_key, minhash_signature

    n = len(kept)
    keys = np.zeros((n, 16), dtype=np.uint8)
    sigs = np.zeros((n, cfg.num_perm if "near_dedup" in cfg.steps else 0), dtype=np.uint32)
    for i, doc in enumerate(kept):
        if "exact_dedup" in cfg.steps:
            keys[i] = np.frombuffer(exact_key(doc["text"]), dtype=np.uint8)
        if "near_dedup" in cfg.steps:
            sig = minhash_signature(doc["text"], cfg.num_perm, cfg.shingle_size, cfg.seed)
            sigs[i] = sig  # MinHash values are below 2**32: half the memory of datasketch's uint64
    nbytes = np.array([len(d["text"].encode("utf-8")) for d in kept], dtype=np.int64)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, keys=keys, sigs=sigs, nbytes=nbytes)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- stage 2: dedup


def find_duplicates(tasks: list[dict], cfg: CleanConfig, work: Path) -> dict:
    """Which kept rows of which shard are duplicates (all but the first copy in corpus order),
    with the dedup steps' stats and the near-duplicate clusters."""
    from lmforge.data.dedup import cluster_report, near_duplicate_clusters

    # --- every kept document: (shard, row), its key, signature and size
    where: list[tuple[int, int]] = []
    keys, sigs, nbytes = [], [], []
    for s, t in enumerate(tasks):
        with np.load(work / f"{t['name']}.dedup.npz") as z:
            keys.append(z["keys"])
            sigs.append(z["sigs"])
            nbytes.append(z["nbytes"])
            where.extend((s, r) for r in range(len(z["nbytes"])))
    keys = np.concatenate(keys) if keys else np.zeros((0, 16), np.uint8)
    sigs = np.concatenate(sigs) if sigs else np.zeros((0, 0), np.uint32)
    nbytes = np.concatenate(nbytes) if nbytes else np.zeros(0, np.int64)
    alive = np.ones(len(where), dtype=bool)
    duplicate_of: dict[str, dict[int, int]] = {}  # step -> {removed document: the one it copies}
    steps, clusters_out = {}, None
    for name in (s for s in cfg.steps if s in DEDUP_STEPS):
        st = _new_stats()
        copies = duplicate_of[name] = {}
        idx = np.flatnonzero(alive)
        st["docs_in"], st["bytes_in"] = len(idx), int(nbytes[idx].sum())
        if name == "exact_dedup":
            # sorting 16-byte keys: 16 bytes per document, where a dict of them costs ~100
            flat = np.ascontiguousarray(keys[idx]).view("V16").ravel()
            _, first, group = np.unique(flat, return_index=True, return_inverse=True)
            dup = first[group] != np.arange(len(idx))  # an earlier copy exists
            for j in np.flatnonzero(dup):
                alive[idx[j]] = False
                copies[int(idx[j])] = int(idx[first[group[j]]])
            if dup.any():
                st["removed"]["exact_duplicate"] = int(dup.sum())
        else:
            clusters = near_duplicate_clusters(
                list(range(len(idx))),
                sigs[idx].astype(np.uint64),
                cfg.dedup_threshold,
                cfg.num_perm,
                cfg.seed,
            )
            clusters = [[int(idx[m]) for m in c] for c in clusters]
            for c in clusters:
                for m in c[1:]:
                    alive[m] = False
                    copies[m] = c[0]
                    st["removed"]["near_duplicate"] += 1
            texts = _Snippets(tasks, where, work, cfg.output_format)
            clusters_out = cluster_report(clusters, texts)
            for ex in clusters_out["examples"]:  # positions mean nothing outside this run
                ex["members"] = [texts.doc(m)["id"] for m in ex["members"]]
        kept = np.flatnonzero(alive)
        st["docs_kept"] = int(len(kept))
        st["bytes_kept"] = int(nbytes[kept].sum())
        steps[name] = st
    drops: dict[str, list[int]] = {}
    for i in np.flatnonzero(~alive):
        s, r = where[i]
        drops.setdefault(tasks[s]["name"], []).append(r)
    # --- a few examples per step, each with the document it repeats
    snippets = _Snippets(tasks, where, work, cfg.output_format)
    for name, st in steps.items():
        reason = "exact_duplicate" if name == "exact_dedup" else "near_duplicate"
        copies = duplicate_of[name]
        st["examples"][reason] = [
            {**snippets.doc(i), "duplicate_of": snippets.doc(copies[i])["id"]}
            for i in sorted(copies)[: cfg.examples]
        ]
    return {"drops": drops, "steps": steps, "clusters": clusters_out}


class _Snippets:
    """Text of a kept document by its corpus index, read lazily from its stage-1 shard."""

    def __init__(self, tasks, where, work: Path, fmt: str):
        self.tasks, self.where, self.work, self.fmt = tasks, where, work, fmt
        self._cache: dict[int, list[dict]] = {}

    def doc(self, i: int) -> dict:
        s, r = self.where[i]
        if s not in self._cache:
            path = self.work / (self.tasks[s]["name"] + _ext(self.fmt))
            self._cache = {s: _read_docs(path, self.fmt)}  # one shard at a time
        return _snippet(self._cache[s][r])

    def __call__(self, i: int) -> str:
        return self.doc(i)["text"]


# --------------------------------------------------------------------------- stage 3: output


def finish_shard(task: dict) -> str:
    """Move a cleaned shard to its final place, without the rows dedup dropped."""
    fmt = task["cfg"].output_format
    src = Path(task["work"]) / (task["name"] + _ext(fmt))
    dest = Path(task["out"]) / (task["name"] + _ext(fmt))
    if dest.exists():
        return task["name"]  # finished by an earlier, killed run
    dest.parent.mkdir(parents=True, exist_ok=True)
    drop = set(task["drop"])
    if drop:
        docs = _read_docs(src, fmt)
        _write_docs(dest, [d for r, d in enumerate(docs) if r not in drop], fmt)
    else:
        shutil.copyfile(src, dest.with_name(f".{dest.name}.tmp"))
        os.replace(dest.with_name(f".{dest.name}.tmp"), dest)
    return task["name"]


# --------------------------------------------------------------------------- the stage


def check_dependencies(cfg: CleanConfig) -> None:
    """Fail before any work when a step's library is missing, naming the extra that has it."""
    needs = [
        ("normalize" in cfg.steps and cfg.fix_unicode, "normalize", "ftfy", "data"),
        ("language" in cfg.steps, "language", "py3langid", "data"),
        ("near_dedup" in cfg.steps, "near_dedup", "datasketch", "data"),
        (cfg.output_format == "parquet", "output_format parquet", "pyarrow", "data"),
        (cfg.executor == "ray", "executor ray", "ray", "ray"),
    ]
    for used, what, module, extra in needs:
        if used and importlib.util.find_spec(module) is None:
            raise RuntimeError(f"clean {what} needs {module}: pip install 'lmforge[{extra}]'")


def run(cfg: CleanConfig, data: DataConfig, base_dir: str, out_dir: str | Path, log=print) -> dict:
    """Clean every source of `data` into out_dir; returns the report (also report.json/.md)."""
    if not data.sources:
        raise DataError("data.sources is empty: nothing to clean")
    if not cfg.steps:
        raise DataError("clean.steps is empty: name the steps to run, e.g. [normalize, quality]")
    check_dependencies(cfg)
    out = Path(out_dir)
    work = out / ".work"
    tasks = plan_shards(cfg, data, base_dir)
    h = _plan_hash(cfg, tasks)
    state = work / "plan.json"
    if state.exists() and read_json(state, "clean plan").get("hash") != h:
        # scratch of another configuration or other input files: it cannot be resumed
        shutil.rmtree(work)
        for src in data.sources:
            shutil.rmtree(out / src.name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    write_json(state, {"hash": h, "shards": len(tasks)})
    (out / "report.json").unlink(missing_ok=True)
    for t in tasks:
        t.update(cfg=cfg, work=str(work), out=str(out))
    done = sum((work / f"{t['name']}.stats.json").exists() for t in tasks)
    if done:
        log(f"[clean] resuming: {done} of {len(tasks)} shards already cleaned")

    with session(cfg.executor, cfg.num_workers, cfg.ray_address):
        results, dedup = _run_stages(cfg, tasks, work, log)
    report = build_report(cfg, tasks, results, dedup)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    shutil.rmtree(work)
    return report


def _warm_up(cfg: CleanConfig) -> None:
    """Load models and tables once here: forked workers inherit them (the language model alone
    takes 0.7 s to load, per process)."""
    doc = {"id": "warm-up", "source": "", "lang": "en", "text": "Warm up the steps. 预热。"}
    for _, step in _doc_steps(cfg):
        step(dict(doc), _new_stats())
    if "near_dedup" in cfg.steps:
        from lmforge.data.dedup import minhash_signature

        minhash_signature(doc["text"], cfg.num_perm, cfg.shingle_size, cfg.seed)


def _run_stages(cfg: CleanConfig, tasks: list[dict], work: Path, log) -> tuple[list, dict]:
    # --- stage 1: per-document steps, in parallel over shards
    if cfg.executor == "local" and cfg.num_workers > 1:
        _warm_up(cfg)
    total = sum(t["stop"] - t["start"] for t in tasks)
    results: list[dict | None] = [None] * len(tasks)
    with tqdm(total=total, unit="doc", desc="clean", delay=2.0) as bar:
        for i, r in map_tasks(clean_shard, tasks, cfg.executor, cfg.num_workers, cfg.ray_address):
            results[i] = r
            bar.update(r["docs_in"])

    # --- stage 2: corpus-wide dedup, in this process (it needs every key at once)
    dedup = {"drops": {}, "steps": {}, "clusters": None}
    if any(s in cfg.steps for s in DEDUP_STEPS):
        done = work / "dedup.json"
        if done.exists():
            dedup = read_json(done, "dedup result")
        else:
            log(f"[clean] deduplicating {sum(r['docs_out'] for r in results):,} documents")
            dedup = find_duplicates(tasks, cfg, work)
            write_json(done, dedup)

    # --- stage 3: final shards without the duplicates
    finals = [dict(t, drop=dedup["drops"].get(t["name"], [])) for t in tasks]
    for _ in map_tasks(finish_shard, finals, cfg.executor, cfg.num_workers, cfg.ray_address):
        pass
    return results, dedup


def summary(report: dict) -> dict:
    """The few figures of a report that `lmforge run` keeps in stage.json."""
    removed = {name: st["docs_in"] - st["docs_kept"] for name, st in report["steps"].items()}
    keys = ("docs_in", "bytes_in", "docs_out", "bytes_out", "n_problems")
    return {**{k: report[k] for k in keys}, "removed": removed}


def cleaned_sources(data: DataConfig, clean_dir: str | Path) -> DataConfig:
    """The `data` section with every source read from its cleaned shards instead."""
    sources = [
        dataclasses.replace(
            s,
            path=str(Path(clean_dir) / s.name),
            format="auto",
            text_field="text",
            split_on="blank_line",
            min_chars=0,
            max_docs=0,
        )
        for s in data.sources
    ]
    return dataclasses.replace(data, sources=sources)


# --------------------------------------------------------------------------- the report


def build_report(cfg: CleanConfig, tasks: list[dict], results: list[dict], dedup: dict) -> dict:
    """Stats of all shards merged, in shard order (so examples do not depend on worker timing)."""
    steps: dict[str, dict] = {}
    for r in results:
        for name, st in r["steps"].items():
            acc = steps.setdefault(name, _new_stats())
            for k in ("docs_in", "bytes_in", "docs_kept", "bytes_kept", "changed"):
                acc[k] += st[k]
            acc["removed"].update(st["removed"])
            acc["counts"].update(st["counts"])
            for reason, ex in st["examples"].items():
                mine = acc["examples"].setdefault(reason, [])
                mine.extend(ex[: cfg.examples - len(mine)])
    for name, st in dedup["steps"].items():
        steps[name] = st
    sources: dict[str, dict] = {}
    drops = dedup["drops"]
    for t, r in zip(tasks, results):
        s = sources.setdefault(r["source"], Counter())
        s.update({k: r[k] for k in ("docs_in", "bytes_in", "docs_out", "bytes_out")})
        s["docs_out"] -= len(drops.get(t["name"], []))
    problems = [p for r in results for p in r["problems"]]
    ordered = {name: _plain(steps[name]) for name in cfg.steps if name in steps}
    return {
        "steps": ordered,
        "sources": {k: dict(v) for k, v in sources.items()},
        "docs_in": sum(r["docs_in"] for r in results),
        "bytes_in": sum(r["bytes_in"] for r in results),
        "docs_out": sum(s["docs_out"] for s in sources.values()),
        "bytes_out": _bytes_out(results, ordered),
        "shards": len(tasks),
        "problems": problems[:MAX_PROBLEMS],
        "n_problems": sum(r["n_problems"] for r in results),
        "clusters": dedup["clusters"],
    }


def _bytes_out(results: list[dict], steps: dict) -> int:
    last = [s for s in DEDUP_STEPS if s in steps]
    if last:
        return steps[last[-1]]["bytes_kept"]
    return sum(r["bytes_out"] for r in results)


def _plain(st: dict) -> dict:
    return {
        **st,
        "removed": dict(Counter(st["removed"]).most_common()),
        "counts": dict(Counter(st["counts"]).most_common()),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def report_markdown(report: dict) -> str:
    lines = [
        "# Cleaning report",
        "",
        f"{report['docs_in']:,} documents ({_mb(report['bytes_in'])} MB) in, "
        f"{report['docs_out']:,} ({_mb(report['bytes_out'])} MB) kept, in {report['shards']} shards.",
        "",
        "| step | docs in | kept | removed | MB in | MB kept | changed | removed by rule |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, st in report["steps"].items():
        rules = ", ".join(f"{k} {v:,}" for k, v in st["removed"].items()) or "-"
        lines.append(
            f"| {name} | {st['docs_in']:,} | {st['docs_kept']:,} | "
            f"{st['docs_in'] - st['docs_kept']:,} | {_mb(st['bytes_in'])} | "
            f"{_mb(st['bytes_kept'])} | {st['changed']:,} | {rules} |"
        )
    lines += ["", "| source | docs in | docs kept | MB in |", "|---|---|---|---|"]
    for name, s in report["sources"].items():
        lines.append(f"| {name} | {s['docs_in']:,} | {s['docs_out']:,} | {_mb(s['bytes_in'])} |")
    for name, st in report["steps"].items():
        if st["counts"]:
            found = ", ".join(f"{k} {v:,}" for k, v in st["counts"].items())
            lines += ["", f"**{name}** found: {found}"]
    if report["clusters"]:
        c = report["clusters"]
        lines += [
            "",
            "## Near-duplicate clusters",
            "",
            "```",
            json.dumps(c, ensure_ascii=False, indent=1)[:4000],
            "```",
        ]
    if any(st["examples"] for st in report["steps"].values()):
        lines += ["", "## Examples of removed documents"]
    for name, st in report["steps"].items():
        for reason, exs in st["examples"].items():
            lines += ["", f"### {name}: {reason}"]
            for ex in exs:
                extra = f" (copy of {ex['duplicate_of']})" if "duplicate_of" in ex else ""
                text = ex["text"].replace("\n", " ⏎ ")
                lines.append(f"- `{ex['id']}`{extra}: {text}")
    if report["n_problems"]:
        lines += ["", f"## Unreadable input ({report['n_problems']:,} lines skipped)", ""]
        lines += [f"- {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"
