"""Multiple-choice benchmarks (MMLU, CMMLU, ARC, HellaSwag) scored by log-likelihood.

Every format loads into the same row, {question, choices, gold, subject}; a task (YAML in
`lmforge/eval/tasks/`) says which format, where the data lies, which split, how many few-shot
examples and how to write the prompt. The model never generates: each choice is a continuation
of the prompt, and the choice with the highest summed log-probability is the answer (`acc`), or
the highest per byte of the choice text (`acc_norm`, as lm-evaluation-harness), which removes the
bias towards short choices.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge.config import ConfigError
from lmforge.eval.scoring import loglikelihood

REPO = Path(__file__).resolve().parents[2]
FORMATS = ("mmlu", "cmmlu", "ceval", "arc", "hellaswag")
LETTERS = "ABCDEFGH"


@dataclass
class MCTask:  # one file in lmforge/eval/tasks/
    name: str
    format: str  # mmlu | cmmlu | arc | hellaswag
    path: str  # data folder, relative to the repo root unless absolute
    split: str = (
        "dev"  # the split to evaluate: <path>/<split>/*.csv(.gz) or <path>/<split>.jsonl(.gz)
    )
    fewshot_split: str = "dev"  # where few-shot examples come from (never the question itself)
    num_fewshot: int = 0
    description: str = ""  # put before the examples; may use {subject}
    prompt: str = "Question: {question}\nAnswer:"  # may use {question}, {choices}, {subject}
    target: str = " {choice}"  # a choice's continuation: {choice} (its text) or {letter}

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"task {self.name}: format {self.format!r} is not one of {FORMATS}")
        if self.num_fewshot < 0:
            raise ConfigError(f"task {self.name}: num_fewshot must be >= 0")


def load_task(path: str | Path) -> MCTask:
    """A task from YAML; a bare name means lmforge/eval/tasks/<name>.yaml."""
    p = Path(path)
    if not p.suffix:
        p = Path(__file__).parent / "tasks" / f"{path}.yaml"
    d = yaml.safe_load(p.read_text(encoding="utf-8"))
    fields = set(MCTask.__dataclass_fields__)
    unknown = set(d) - fields
    if unknown:
        raise ConfigError(f"{p}: unknown keys {sorted(unknown)}; valid: {sorted(fields)}")
    return MCTask(**d)


# --- loading: every format -> {question, choices, gold, subject}


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")


def _split_files(root: Path, split: str, pattern: str) -> list[Path]:
    files = sorted((root / split).glob(pattern)) if (root / split).is_dir() else []
    files = files or [
        f for f in (root / f"{split}.jsonl", root / f"{split}.jsonl.gz") if f.exists()
    ]
    if not files:
        raise ConfigError(f"no {split} data in {root}")
    return files


def _subject(path: Path) -> str:
    name = path.name.split(".")[0]
    return name.removesuffix("_dev").removesuffix("_test").removesuffix("_val")


def load_rows(fmt: str, path: str | Path, split: str) -> list[dict]:
    root = Path(path) if Path(path).is_absolute() else REPO / path
    rows = []
    if fmt in ("mmlu", "cmmlu", "ceval"):
        for f in _split_files(root, split, "*.csv*"):
            for r in csv.DictReader(io.StringIO(_read_text(f))):
                if fmt == "mmlu":  # the mirror's reformatted files: choice0-3, 0-based answer
                    choices = [r[f"choice{i}"] for i in range(4)]
                    gold = int(r["answer"])
                    question = r["question"]
                else:  # CMMLU: ,Question,A,B,C,D,Answer; C-Eval: id,question,A-D,answer,...
                    choices = [r[c] for c in "ABCD"]
                    gold = LETTERS.index((r.get("Answer") or r.get("answer") or "").strip())
                    question = r.get("Question") or r.get("question")
                rows.append(
                    {"question": question, "choices": choices, "gold": gold, "subject": _subject(f)}
                )
        return rows
    for f in _split_files(root, split, "*.jsonl*"):
        for line in _read_text(f).splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if fmt == "arc":  # answerKey is a label: "A"-"E", or "1"-"4" in some questions
                labels = [c["label"] for c in r["question"]["choices"]]
                choices = [c["text"] for c in r["question"]["choices"]]
                row = {
                    "question": r["question"]["stem"],
                    "choices": choices,
                    "gold": labels.index(r["answerKey"]),
                }
            else:  # hellaswag: the context is continued by one of four endings
                row = {"question": r["ctx"], "choices": r["endings"], "gold": int(r["label"])}
            rows.append(row | {"subject": r.get("activity_label", "")})
    return rows


# --- prompts


def _prompt(task: MCTask, row: dict) -> str:
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    return task.prompt.format(question=row["question"], choices=listed, subject=row["subject"])


def _target(task: MCTask, row: dict, i: int) -> str:
    return task.target.format(choice=row["choices"][i], letter=LETTERS[i])


def build_context(task: MCTask, row: dict, shots: list[dict]) -> str:
    """Description, then the first k rows of the few-shot pool (of the same subject for MMLU and
    CMMLU) that are not the question itself, each answered, then the question."""
    by_subject = task.format in ("mmlu", "cmmlu")
    same = [
        s
        for s in shots
        if s["question"] != row["question"] and (not by_subject or s["subject"] == row["subject"])
    ]
    parts = [_prompt(task, s) + _target(task, s, s["gold"]) for s in same[: task.num_fewshot]]
    head = task.description.format(subject=row["subject"].replace("_", " "))
    return head + "\n\n".join(parts + [_prompt(task, row)])


# --- evaluation


def _stats(correct: list[bool]) -> tuple[float, float]:
    n = len(correct)
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / n)


def evaluate_mc(
    model,
    tok,
    task: MCTask | str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    share_context: bool = True,
) -> dict:
    """Accuracy and byte-length-normalised accuracy with standard errors over the task's split
    (its first `limit` rows). Ties go to the first choice: a model with uniform logits answers
    choice 0 whenever the choices have equal token lengths."""
    task = task if isinstance(task, MCTask) else load_task(task)
    rows = load_rows(task.format, task.path, task.split)[:limit]
    shots = load_rows(task.format, task.path, task.fewshot_split) if task.num_fewshot else []
    bos = [tok.bos_id] if tok.prepend_bos else []
    requests, spans = [], []
    for row in rows:
        ctx = bos + tok.encode(build_context(task, row, shots))
        spans.append((len(requests), len(row["choices"])))
        requests += [(ctx, tok.encode(_target(task, row, i))) for i in range(len(row["choices"]))]
    scores = [s for s, _ in loglikelihood(model, requests, batch_size, share_context)]
    acc, acc_norm = [], []
    for row, (start, n) in zip(rows, spans):
        ll = scores[start : start + n]
        per_byte = [s / len(_target(task, row, i).encode("utf-8")) for i, s in enumerate(ll)]
        acc.append(max(range(n), key=ll.__getitem__) == row["gold"])  # max keeps the first of ties
        acc_norm.append(max(range(n), key=per_byte.__getitem__) == row["gold"])
    a, a_se = _stats(acc)
    an, an_se = _stats(acc_norm)
    return {
        "task": task.name,
        "acc": a,
        "acc_stderr": a_se,
        "acc_norm": an,
        "acc_norm_stderr": an_se,
        "n": len(rows),
    }
