"""`lmforge eval CKPT --tasks a,b,c`: run evaluation tasks, write one JSON file per task and a
table; `--compare A B` puts two result folders side by side.

The one idea: every task reduces to rows of (task, metric, value, standard error, n), saved
with the model, the task's settings and the seed, so a number can always be traced back to
what produced it, and two checkpoints compare row by row.

Task names:
- a file in lmforge/tasks/ (mmlu, cmmlu, arc_challenge, hellaswag, ...) or a path to a
  task YAML of that shape: multiple choice by log-likelihood;
- truthfulqa: MC1 and MC2 by log-likelihood, as lm-evaluation-harness (eval/truthfulqa.py);
- truthfulqa_gen: a greedy answer per question, BLEU and ROUGE against the true and false
  references (max, acc, diff), as lm-eval's truthfulqa_gen;
- gsm8k, humaneval: the bundled generative sets (datasets/eval/). GSM8K scores its test split
  8-shot from the first train rows. HumanEval runs model-written
  code: it refuses a sandbox below the medium level (see eval/sandbox.py) unless unsafe_exec,
  and its result file records the isolation level and layers that were in force;
- lm:PATH: loss, perplexity and bits per byte of a text file, or of each language's validation
  shard in a prepared data folder (its first `limit` tokens), with sliding windows;
- sim:PATH: BLEU and ROUGE on a JSONL file of {"source", "reference"} rows;
- tasks run by the callers' `runners` ({name: fn(model, tok, limit, seed) -> (rows,
  settings)}): the safety tasks of lmforge/safety_suite.py come in that way.

`limit` takes a stratified sample of tasks with subjects (MMLU, CMMLU, C-Eval: each subject in
proportion, drawn with `seed`), else the first rows. `log_samples` keeps one record per scored
question in the task's JSON (`samples`), with the row's index in the whole split; the prompt
builders (`tasks.multiple_choice.build_context`, `truthfulqa.build_context`,
`tasks.gsm8k.gsm8k_prompt`) rebuild the exact text the model read.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ConfigError
from lmforge.data.loader import memmap_tokens, read_manifest
from lmforge.eval import generative, truthfulqa
from lmforge.eval.multiple_choice import evaluate_mc
from lmforge.eval.sandbox import check_isolation
from lmforge.eval.scoring import perplexity
from lmforge.eval.similarity import evaluate_similarity
from lmforge.io import write_json
from lmforge.model.load import load
from lmforge.tasks.gsm8k import GSM8K_SHOT_POOL
from lmforge.tasks.multiple_choice import TASK_DIR, load_task, splits

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


def _task_yaml(name: str) -> Path:
    path = Path(name) if Path(name).suffix in (".yaml", ".yml") else TASK_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
        raise ConfigError(
            f"unknown task {name!r}: choose from "
            f"{', '.join(known + ['gsm8k', 'humaneval', 'truthfulqa', 'truthfulqa_gen'])}, "
            "lm:PATH, sim:PATH, or a task YAML file"
        )
    return path


def _load_mc_task(name: str):
    task = load_task(_task_yaml(name))
    if not Path(task.path).is_absolute() and not Path(task.path).exists():
        task.path = str(REPO / task.path)  # bundled data, wherever the command runs from
    return task


def check_options(name: str, split: str | None, num_fewshot: int | None) -> None:
    """Refuse a split the task does not have (listing those it has) and a k it cannot take,
    before any model loads: a bad option on the last task must not cost the first ones' run."""
    max_k: int | None = 0  # tasks without few-shot examples
    if name.startswith(("lm:", "sim:")):
        present = []
    elif name == "gsm8k":
        present, max_k = ["test", "train"], GSM8K_SHOT_POOL
    elif name in ("truthfulqa", "truthfulqa_gen"):
        present = ["validation"]
    elif name == "humaneval":
        present = ["test"]
    else:
        task = _load_mc_task(name)
        present, max_k = splits(Path(task.path)), None
    if split is not None and split not in present:
        one_file = name.startswith(("lm:", "sim:"))
        listed = ", ".join(present) or ("none (it reads one file)" if one_file else "none")
        raise ConfigError(f"task {name}: no split {split!r}; splits present: {listed}")
    if num_fewshot and max_k == 0:
        raise ConfigError(f"task {name} takes no few-shot examples: --num-fewshot must be 0")
    if num_fewshot is not None and max_k is not None and num_fewshot > max_k:
        raise ConfigError(f"task {name}: --num-fewshot {num_fewshot} is out of range: 0..{max_k}")


def run_task(
    model,
    tok,
    name: str,
    limit: int | None,
    seed: int,
    unsafe_exec: bool = False,
    split: str | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    runners: dict | None = None,
) -> tuple[list[dict], dict]:
    """(result rows, settings) of one task. split and num_fewshot override the task's own;
    settings record the split, the few-shot split and k, how rows were chosen (`sample`) and,
    with log_samples, one record per scored question (`samples`)."""
    torch.manual_seed(seed)
    if runners and name in runners:
        rows, settings = runners[name](model, tok, limit, seed)
        if not log_samples:
            settings.pop("samples", None)
        return rows, settings
    check_options(name, split, num_fewshot)
    if name.startswith("lm:"):
        path = Path(name[3:])
        keys = ["loss", "perplexity", "bits_per_byte"]
        stride = max(1, model.cfg.max_seq_len // 2)  # every token after the first is scored,
        # with at least half a context of history once past the first window
        if (path / "manifest.json").is_file():  # a prepared data folder: its validation shards
            manifest, rows = read_manifest(path), []
            for lang, val in sorted(manifest.get("val", {}).items()):
                ids = memmap_tokens(path, val["file"], np.dtype(manifest["dtype"]))[: limit or None]
                m = perplexity(model, tok, ids.astype(np.int64).tolist(), stride)
                rows += _rows(f"{name}:{lang}", m, keys)
            if not rows:
                raise ConfigError(f"lm task: {path} has no validation shards")
            sample = f"first {limit} tokens of each shard" if limit else "all"
            return rows, {"path": str(path), "split": "val", "max_tokens": limit, "sample": sample}
        if not path.is_file():
            raise ConfigError(f"lm task: text file or prepared data folder not found: {path}")
        m = perplexity(model, tok, path.read_text(encoding="utf-8"), stride)
        return _rows(name, m, keys), {"path": str(path), "stride": stride}
    if name.startswith("sim:"):
        m = evaluate_similarity(model, tok, name[4:], limit=limit)
        return _rows(name, m, ["bleu", "rouge1", "rouge2", "rougeL"]), {
            "path": name[4:],
            "sample": f"first {limit}" if limit else "all",
        }
    if name == "gsm8k":
        return _gsm8k(model, tok, limit, split or "test", num_fewshot, log_samples)
    if name == "truthfulqa":
        path = REPO / "datasets" / "eval" / "truthfulqa" / "TruthfulQA.csv.gz"
        m = truthfulqa.evaluate_truthfulqa(model, tok, path, limit, log_samples=log_samples)
        settings = {"path": str(path), "split": truthfulqa.SPLIT, "fewshot_split": None,
                    "num_fewshot": 0, "primer": "lm-eval's 6 question/answer pairs"}  # fmt: skip
        return _rows(name, m, ["mc1", "mc2"]), settings | _picked(m)
    if name == "truthfulqa_gen":
        return _truthfulqa_gen(model, tok, limit, log_samples)
    if name == "humaneval":
        m = generative.evaluate_humaneval(
            model, tok, _bundled("humaneval"), limit=limit, unsafe_exec=unsafe_exec
        )
        keys = [k for k in m if k.startswith("pass@") and not k.endswith("_stderr")]
        settings = {"split": "test", "n_samples": m["n_samples"], "isolation": m["isolation"]}
        how = f"first {m['n']}" if limit else f"all {m['n']}"
        return _rows(name, m, keys), settings | {"sample": how}
    return _multiple_choice(model, tok, name, limit, seed, split, num_fewshot, log_samples)


def _picked(m: dict) -> dict:
    """The settings a metrics dict carries: how rows were chosen, and the per-question log."""
    return {k: m[k] for k in ("sample", "samples") if k in m}


def _truthfulqa_gen(model, tok, limit, log_samples) -> tuple[list[dict], dict]:
    """TruthfulQA generation: greedy, after the MC tasks' primer, no chat template (as the MC
    tasks, also for instruct models)."""
    path = REPO / "datasets" / "eval" / "truthfulqa" / "TruthfulQA.csv.gz"
    m = truthfulqa.evaluate_truthfulqa_gen(model, tok, path, limit, log_samples=log_samples)
    keys = [f"{k}_{s}" for k in truthfulqa.GEN_METRICS for s in ("max", "acc", "diff")]
    settings = {"path": str(path), "split": truthfulqa.SPLIT, "fewshot_split": None,
                "num_fewshot": 0, "primer": "lm-eval's 6 question/answer pairs",
                "stop": list(truthfulqa.GEN_STOP), "greedy": True,
                "max_new_tokens": truthfulqa.GEN_MAX_NEW_TOKENS,
                "judge": "none: BLEU/ROUGE similarity to the references (0-100)"}  # fmt: skip
    return _rows("truthfulqa_gen", m, keys), settings | _picked(m)


def _gsm8k(model, tok, limit, split: str, num_fewshot, log_samples) -> tuple[list[dict], dict]:
    """GSM8K on the test split (or train: the rows after the exemplar pool), k-shot from the
    first 8 rows of train."""
    folder = REPO / "datasets" / "eval" / "gsm8k"
    files = {"test": folder / "test.jsonl.gz", "train": folder / "train_head300.jsonl.gz"}
    k = GSM8K_SHOT_POOL if num_fewshot is None else num_fewshot
    pool = generative.load_jsonl(files["train"])[:GSM8K_SHOT_POOL]
    # train: the file's own first rows are the pool, so evaluate_gsm8k skips them
    shots = None if split == "train" else pool
    m = generative.evaluate_gsm8k(
        model, tok, files[split], k=k, limit=limit, shots=shots, log_samples=log_samples
    )
    settings = {"path": str(files[split]), "split": split, "fewshot_split": "train",
                "num_fewshot": k, "k": k}  # fmt: skip
    return _rows("gsm8k", m, ["accuracy"]), settings | _picked(m)


def _multiple_choice(
    model, tok, name, limit, seed, split, num_fewshot, log_samples
) -> tuple[list[dict], dict]:
    task = _load_mc_task(name)
    overrides = {"split": split, "num_fewshot": num_fewshot}
    task = dataclasses.replace(task, **{k: v for k, v in overrides.items() if v is not None})
    m = evaluate_mc(model, tok, task, limit=limit, seed=seed, log_samples=log_samples)
    keys = ("format", "split", "fewshot_split", "num_fewshot", "path")
    settings = {k: getattr(task, k) for k in keys}
    return _rows(task.name, m, ["acc", "acc_norm"]), settings | _picked(m)


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
    split: str | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    runners: dict | None = None,
) -> list[dict]:
    """Evaluate the checkpoint on each task; writes out_dir/<task>.json; returns all rows.
    `runners`: tasks defined by the caller, by name (see run_task)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    for name in tasks:
        if runners and name in runners:
            if split is not None or num_fewshot:
                raise ConfigError(f"task {name} takes no --split or --num-fewshot")
            continue
        check_options(name, split, num_fewshot)
    if "humaneval" in tasks:  # refuse before the model loads, not after the other tasks
        check_isolation(unsafe_exec)
    model, tok = load(ckpt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in tasks:
        t0 = time.perf_counter()
        task_rows, settings = run_task(
            model, tok, name, limit, seed, unsafe_exec, split, num_fewshot, log_samples, runners
        )
        isolation = settings.pop("isolation", None)
        samples = settings.pop("samples", None)
        # every record says which split, which examples and which rows, even where moot
        defaults = {"split": None, "fewshot_split": None, "num_fewshot": 0, "sample": "all"}
        settings = defaults | settings
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
        if samples is not None:  # one record per scored question, in the order scored
            record["samples"] = samples
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
