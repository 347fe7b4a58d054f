"""Multiple-choice tasks (MMLU, CMMLU, C-Eval, ARC, HellaSwag): the YAML definitions beside this
file, every data format read into one row, and the prompt each choice continues.

Every format loads into the same row, {question, choices, gold, subject}; a task (a YAML file
in `lmforge/tasks/`) says which format, where the data lies, which split, how many few-shot
examples and how to write the prompt. `build_context` and `target` are the exact texts the
scorer (`lmforge/eval/multiple_choice.py`) compares choices by.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = Path(__file__).parent  # the bundled task files: <name>.yaml
FORMATS = ("mmlu", "cmmlu", "ceval", "arc", "hellaswag")
SUBJECT_FORMATS = ("mmlu", "cmmlu", "ceval")  # one file per subject: --limit samples each
LETTERS = "ABCDEFGH"


@dataclass
class MCTask:  # one file in lmforge/tasks/
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
    """A task from YAML; a bare name means lmforge/tasks/<name>.yaml."""
    p = Path(path)
    if not p.suffix:
        p = TASK_DIR / f"{path}.yaml"
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
