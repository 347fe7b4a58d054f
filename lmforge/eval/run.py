"""`lmforge eval CKPT --tasks a,b,c`: run evaluation tasks, write one JSON file per task and a
table; `--compare A B` puts two result folders side by side.

The one idea: every task reduces to rows of (task, metric, value, standard error, n), saved
with the model, the task's settings and the seed, so a number can always be traced back to
what produced it, and two checkpoints compare row by row.

Task names:
- a file in lmforge/eval/tasks/ (mmlu, cmmlu, arc_challenge, hellaswag, ...) or a path to a
  task YAML of that shape: multiple choice by log-likelihood;
- gsm8k, humaneval: the bundled generative sets (datasets/eval/). HumanEval runs model-written
  code: it refuses a sandbox below the medium level (see eval/sandbox.py) unless unsafe_exec,
  and its result file records the isolation level and layers that were in force;
- lm:PATH: loss, perplexity and bits per byte of a text file, or of each language's validation
  shard in a prepared data folder (its first `limit` tokens), with sliding windows;
- sim:PATH: BLEU and ROUGE on a JSONL file of {"source", "reference"} rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.io import write_json

TASK_DIR = Path(__file__).parent / "tasks"
REPO = Path(__file__).resolve().parents[2]


def _rows(task: str, metrics: dict, keys: list[str]) -> list[dict]:
    """Result rows for the metrics present, each with its standard error when there is one."""
    n = metrics.get("n", metrics.get("tokens"))
    return [
        {
            "task": task,
            "metric": k,
            "value": metrics[k],
            "stderr": metrics.get(f"{k}_stderr"),
            "n": n,
        }
        for k in keys
        if k in metrics
    ]


def run_task(
    model, tok, name: str, limit: int | None, seed: int, unsafe_exec: bool = False
) -> tuple[list[dict], dict]:
    """(result rows, settings) of one task."""
    import torch

    torch.manual_seed(seed)
    if name.startswith("lm:"):
        from lmforge.eval.scoring import perplexity

        path = Path(name[3:])
        keys = ["loss", "perplexity", "bits_per_byte"]
        stride = max(1, model.cfg.max_seq_len // 2)  # every token after the first is scored,
        # with at least half a context of history once past the first window
        if (path / "manifest.json").is_file():  # a prepared data folder: its validation shards
            import numpy as np

            from lmforge.data.loader import _memmap, read_manifest

            manifest, rows = read_manifest(path), []
            for lang, val in sorted(manifest.get("val", {}).items()):
                ids = _memmap(path, val["file"], np.dtype(manifest["dtype"]))[: limit or None]
                m = perplexity(model, tok, ids.astype(np.int64).tolist(), stride)
                rows += _rows(f"{name}:{lang}", m, keys)
            if not rows:
                raise ConfigError(f"lm task: {path} has no validation shards")
            return rows, {"path": str(path), "max_tokens": limit}
        if not path.is_file():
            raise ConfigError(f"lm task: text file or prepared data folder not found: {path}")
        m = perplexity(model, tok, path.read_text(encoding="utf-8"), stride)
        return _rows(name, m, keys), {"path": str(path), "stride": stride}
    if name.startswith("sim:"):
        from lmforge.eval.similarity import evaluate_similarity

        m = evaluate_similarity(model, tok, name[4:], limit=limit)
        return _rows(name, m, ["bleu", "rouge1", "rouge2", "rougeL"]), {"path": name[4:]}
    if name in ("gsm8k", "humaneval"):
        from lmforge.eval import generative

        if name == "gsm8k":
            m = generative.evaluate_gsm8k(model, tok, _bundled("gsm8k"), limit=limit)
            return _rows(name, m, ["accuracy"]), {"k": m.get("k")}
        m = generative.evaluate_humaneval(
            model, tok, _bundled("humaneval"), limit=limit, unsafe_exec=unsafe_exec
        )
        keys = [k for k in m if k.startswith("pass@") and not k.endswith("_stderr")]
        return _rows(name, m, keys), {"n_samples": m["n_samples"], "isolation": m["isolation"]}
    from lmforge.eval.multiple_choice import evaluate_mc, load_task

    path = Path(name) if Path(name).suffix in (".yaml", ".yml") else TASK_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
        raise ConfigError(
            f"unknown task {name!r}: choose from {', '.join(known + ['gsm8k', 'humaneval'])}, "
            "lm:PATH, sim:PATH, or a task YAML file"
        )
    task = load_task(path)
    if not Path(task.path).is_absolute() and not Path(task.path).exists():
        task.path = str(REPO / task.path)  # bundled data, wherever the command runs from
    m = evaluate_mc(model, tok, task, limit=limit)
    settings = {k: getattr(task, k) for k in ("format", "split", "num_fewshot", "path")}
    return _rows(task.name, m, ["acc", "acc_norm"]), settings


def _bundled(name: str) -> Path:
    folder = REPO / "datasets" / "eval" / name
    files = sorted(folder.glob("*.jsonl*"))
    if not files:
        raise ConfigError(f"no {name} data under {folder}")
    return files[0]


def run(
    ckpt,
    tasks: list[str],
    out_dir,
    limit: int | None = None,
    seed: int = 0,
    unsafe_exec: bool = False,
) -> list[dict]:
    """Evaluate the checkpoint on each task; writes out_dir/<task>.json; returns all rows."""
    from lmforge.infer.chat import load_for_inference

    if "humaneval" in tasks:  # refuse before the model loads, not after the other tasks
        from lmforge.eval.sandbox import check_isolation

        check_isolation(unsafe_exec)
    model, tok = load_for_inference(ckpt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in tasks:
        t0 = time.perf_counter()
        task_rows, settings = run_task(model, tok, name, limit, seed, unsafe_exec)
        isolation = settings.pop("isolation", None)
        record = {
            "task": name,
            "results": task_rows,
            "model": str(ckpt),
            "config": {**settings, "limit": limit},
            "seed": seed,
            "seconds": time.perf_counter() - t0,
        }
        if isolation:  # how contained the model-written code was (level, layers, gaps)
            record["isolation"] = isolation
        safe = name.replace("/", "_").replace(":", "_")
        write_json(out_dir / f"{safe}.json", record)
        rows += task_rows
    return rows


def read_results(folder) -> list[dict]:
    """Every result row in a folder written by `run`."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ConfigError(f"no evaluation results (*.json) in {folder}")
    return [r for f in files for r in json.loads(f.read_text(encoding="utf-8"))["results"]]


def table(rows: list[dict]) -> str:
    """A Markdown table of result rows."""
    lines = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for r in rows:
        se = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {se} | {r['n']} |")
    return "\n".join(lines)


def compare(a, b) -> str:
    """Two result folders side by side, row by row (task, metric)."""
    ra = {(r["task"], r["metric"]): r for r in read_results(a)}
    rb = {(r["task"], r["metric"]): r for r in read_results(b)}
    lines = [f"| task | metric | {Path(a).name} | {Path(b).name} | difference |"]
    lines.append("|---|---|---:|---:|---:|")
    for key in sorted(set(ra) | set(rb)):
        va, vb = ra.get(key, {}).get("value"), rb.get(key, {}).get("value")
        cells = [f"{v:.4f}" if v is not None else "-" for v in (va, vb)]
        diff = f"{vb - va:+.4f}" if va is not None and vb is not None else "-"
        lines.append(f"| {key[0]} | {key[1]} | {cells[0]} | {cells[1]} | {diff} |")
    return "\n".join(lines)
