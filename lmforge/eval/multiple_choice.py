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
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge.config import ConfigError
from lmforge.eval.scoring import loglikelihood

REPO = Path(__file__).resolve().parents[2]
FORMATS = ("mmlu", "cmmlu", "ceval", "arc", "hellaswag")
SUBJECT_FORMATS = ("mmlu", "cmmlu", "ceval")  # one file per subject: --limit samples each
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


def splits(root: Path) -> list[str]:
    """The splits present in a data folder: subfolders holding files, and <split>.jsonl(.gz)."""
    if not root.is_dir():
        return []
    names = {d.name for d in root.iterdir() if d.is_dir() and any(d.iterdir())}
    names |= {f.name.split(".")[0] for f in root.glob("*.jsonl*")}
    return sorted(names)


def _split_files(root: Path, split: str, pattern: str) -> list[Path]:
    files = sorted((root / split).glob(pattern)) if (root / split).is_dir() else []
    files = files or [
        f for f in (root / f"{split}.jsonl", root / f"{split}.jsonl.gz") if f.exists()
    ]
    if not files:
        present = ", ".join(splits(root)) or "none"
        raise ConfigError(f"no split {split!r} in {root}; splits present: {present}")
    return files


def _subject(path: Path) -> str:
    name = path.name.split(".")[0]
    return name.removesuffix("_dev").removesuffix("_test").removesuffix("_val")


MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def read_mmlu(path: Path) -> list[dict]:
    """One MMLU csv in either form, told apart by its first row: the mirror's (header
    question,choice0..3,answer; 0-based answer) or the official headerless one
    (question,A,B,C,D,letter)."""
    records = list(csv.reader(io.StringIO(_read_text(path))))
    mirror = bool(records) and records[0] == MMLU_HEADER
    rows = []
    for line, rec in enumerate(records[1:] if mirror else records, start=2 if mirror else 1):
        if len(rec) != 6:
            raise ConfigError(f"{path}, row {line}: expected 6 fields, got {len(rec)}")
        answer = rec[5].strip()
        if mirror and answer in ("0", "1", "2", "3"):
            gold = int(answer)
        elif not mirror and answer in ("A", "B", "C", "D"):
            gold = "ABCD".index(answer)
        else:
            want = "0-3 (this file has the mirror's header)" if mirror else "a letter A-D"
            raise ConfigError(f"{path}, row {line}: answer {answer!r} is not {want}")
        rows.append({"question": rec[0], "choices": rec[1:5], "gold": gold})
    return rows


def load_rows(fmt: str, path: str | Path, split: str) -> list[dict]:
    """Every row of a split, files in name order: {question, choices, gold, subject}."""
    root = Path(path) if Path(path).is_absolute() else REPO / path
    rows = []
    if fmt == "mmlu":
        for f in _split_files(root, split, "*.csv*"):
            rows += [r | {"subject": _subject(f)} for r in read_mmlu(f)]
        return rows
    if fmt in ("cmmlu", "ceval"):
        for f in _split_files(root, split, "*.csv*"):
            for r in csv.DictReader(io.StringIO(_read_text(f))):
                # CMMLU: ,Question,A,B,C,D,Answer; C-Eval: id,question,A-D,answer,...
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


# --- which rows: the first N, or a stratified sample


def select_rows(
    rows: list[dict], limit: int | None, seed: int, by_subject: bool
) -> tuple[list[int], str]:
    """(indices into rows, in order; how they were chosen). With subjects, `limit` rows are
    drawn from each subject in proportion to its size (largest remainder, ties to the subject
    that sorts first), at random with this seed: the first N rows of MMLU would all be
    abstract algebra. Without subjects, the first N rows."""
    if limit is None or limit >= len(rows):
        return list(range(len(rows))), f"all {len(rows)}"
    if not by_subject:
        return list(range(limit)), f"first {limit}"
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["subject"], []).append(i)
    exact = {s: limit * len(ix) / len(rows) for s, ix in groups.items()}
    quota = {s: int(q) for s, q in exact.items()}
    by_remainder = sorted(groups, key=lambda s: (-(exact[s] - quota[s]), s))
    for s in by_remainder[: limit - sum(quota.values())]:
        quota[s] += 1
    rng = random.Random(seed)
    picked = [i for s in sorted(groups) for i in rng.sample(groups[s], quota[s])]
    return sorted(picked), f"stratified by subject, seed {seed}"


# --- prompts


def _prompt(task: MCTask, row: dict) -> str:
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    # stripped as lm-evaluation-harness does (`question.strip()`): some MMLU questions end in
    # a space or a newline, which would otherwise sit before "\nA."
    question = row["question"].strip()
    return task.prompt.format(question=question, choices=listed, subject=row["subject"])


def target(task: MCTask, row: dict, i: int) -> str:
    """The continuation scored for choice i (" B" for MMLU)."""
    return task.target.format(choice=row["choices"][i], letter=LETTERS[i])


def build_context(task: MCTask, row: dict, shots: list[dict]) -> str:
    """The exact text every choice of `row` continues: description, then the first k rows of the
    few-shot pool (of the same subject for MMLU, CMMLU and C-Eval) other than the row itself,
    each answered, then the question; parts joined by a blank line. shots = load_rows(format,
    path, fewshot_split). The scorer encodes BOS (if the tokenizer adds one) + this text."""
    by_subject = task.format in SUBJECT_FORMATS
    same = [
        s
        for s in shots
        if (s["question"], s["choices"]) != (row["question"], row["choices"])
        and (not by_subject or s["subject"] == row["subject"])
    ]
    parts = [_prompt(task, s) + target(task, s, s["gold"]) for s in same[: task.num_fewshot]]
    head = task.description.format(subject=row["subject"].replace("_", " "))
    return head + "\n\n".join(parts + [_prompt(task, row)])


# --- evaluation


def _stats(correct: list[bool]) -> tuple[float, float]:
    n = len(correct)
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / n)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # max keeps the first of ties


def evaluate_mc(
    model,
    tok,
    task: MCTask | str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    share_context: bool = True,
    seed: int = 0,
    log_samples: bool = False,
) -> dict:
    """Accuracy and byte-length-normalised accuracy with standard errors over the task's split
    (`limit` rows of it, see select_rows). Ties go to the first choice: a model with uniform
    logits answers choice 0 whenever the choices have equal token lengths. log_samples adds
    one record per question, in the order scored (`samples`)."""
    task = task if isinstance(task, MCTask) else load_task(task)
    all_rows = load_rows(task.format, task.path, task.split)
    if not all_rows:
        raise ConfigError(f"task {task.name}: split {task.split!r} has no rows")
    index, how = select_rows(all_rows, limit, seed, task.format in SUBJECT_FORMATS)
    rows = [all_rows[i] for i in index]
    shots = load_rows(task.format, task.path, task.fewshot_split) if task.num_fewshot else []
    bos = [tok.bos_id] if tok.prepend_bos else []
    requests, spans = [], []
    for row in rows:
        ctx = bos + tok.encode(build_context(task, row, shots))
        spans.append((len(requests), len(row["choices"])))
        requests += [(ctx, tok.encode(target(task, row, i))) for i in range(len(row["choices"]))]
    scores = [
        s for s, _ in loglikelihood(model, requests, batch_size, share_context, desc=task.name)
    ]
    acc, acc_norm, samples = [], [], []
    for i, row, (start, n) in zip(index, rows, spans):
        ll = scores[start : start + n]
        per_byte = [s / len(target(task, row, c).encode("utf-8")) for c, s in enumerate(ll)]
        pred, pred_norm = _argmax(ll), _argmax(per_byte)
        acc.append(pred == row["gold"])
        acc_norm.append(pred_norm == row["gold"])
        if log_samples:
            samples.append(
                {"index": i, "subject": row["subject"], "question": row["question"],
                 "choices": row["choices"], "gold": row["gold"], "loglikelihoods": ll,
                 "pred": pred, "pred_norm": pred_norm}
            )  # fmt: skip
    a, a_se = _stats(acc)
    an, an_se = _stats(acc_norm)
    out = {
        "task": task.name,
        "acc": a,
        "acc_stderr": a_se,
        "acc_norm": an,
        "acc_norm_stderr": an_se,
        "n": len(rows),
        "sample": how,
    }
    return out | {"samples": samples} if log_samples else out
