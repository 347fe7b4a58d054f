"""GSM8K (Cobbe et al. 2021, arXiv:2110.14168): grade-school word problems whose reference ends
in "#### <number>". The prompt format, the answer extractor and the check live here, so
`lmforge eval` (k-shot accuracy) and GRPO (a reward of 1 for a right final number) agree on
what a correct answer is.

The one idea: only the final number counts. `extract_answer` turns a reference or a model's
text into a canonical number string ("1,234.50" -> "1234.5"), and two answers are the same when
those strings are.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from lmforge.config import GRPOConfig
from lmforge.data.readers import DataError, is_val, iter_lines
from lmforge.tasks.base import Encode, Problem, Task
from lmforge.tokenizer import Tokenizer

GSM8K_SHOT_POOL = 8  # the file's first rows are worked examples for prompts and never scored
GSM8K_STOP = ("Question:", "\n\n")  # where a k-shot answer ends: the next question begins

# a number: thousands with commas ("1,234") or plain digits, optional decimals; a minus sign
# counts only when it does not join two words or numbers ("3-4" is a range, not -4)
_NUMBER = re.compile(r"(?<![\w.])(-)?\s?\$?\s?(-)?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")


def _normalize(sign: str, digits: str, decimals: str) -> str | None:
    try:
        value = Decimal(sign + digits.replace(",", "") + (decimals or ""))
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")  # "3.50" -> "3.5", "1E+2" -> "100"


def extract_answer(text: str) -> str | None:
    """The final answer as a canonical number string, or None. Looks after the last "####"
    (GSM8K's reference format) or "answer is", else takes the last number in the text."""
    for marker in ("####", "answer is", "Answer is", "answer:", "Answer:"):
        cut = text.rfind(marker)
        if cut >= 0:
            m = _NUMBER.search(text, cut + len(marker))
            if m:
                return _normalize(m[1] or m[2] or "", m[3], m[4])
    found = list(_NUMBER.finditer(text))
    if not found:
        return None
    m = found[-1]
    return _normalize(m[1] or m[2] or "", m[3], m[4])


def worked_answer(reference: str) -> str:
    """A GSM8K reference as a prompt shows it: calculator notes `<<48/2=24>>` removed and the
    `#### N` line replaced by "The answer is N." (the form `extract_answer` looks for)."""
    reasoning, _, final = reference.partition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return f"{reasoning}\nThe answer is {final.strip()}."


def gsm8k_prompt(question: str, shots: list[dict]) -> str:
    """The exact text the model continues for a question: each shot answered, then the question.
    eval's `gsm8k_outputs` drops whole shots (the last ones) only when the prompt would not fit."""
    parts = [f"Question: {s['question']}\nAnswer: {worked_answer(s['answer'])}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def gsm8k_correct(completion: str, reference: str | None) -> bool:
    """Does the completion's final number (`extract_answer`) equal the reference, a canonical
    number string? A completion without a number is never right."""
    got = extract_answer(completion)
    return got is not None and got == reference


def read_gsm8k(path: Path) -> list[tuple[int, str, str]]:
    """(line, question, reference number) of every row of a GSM8K-style JSONL file; a bad row
    is a DataError naming file and line."""
    rows = []
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string")
        _, marker, final = row["answer"].rpartition("####")
        reference = extract_answer(final) if marker else None
        if reference is None:
            raise DataError(f"{where}: field 'answer' must end with '#### <number>'")
        rows.append((lineno, row["question"], reference))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def gsm8k_task(
    cfg: GRPOConfig, tok: Tokenizer, encode: Encode, path: Path, max_prompt_len: int
) -> Task:
    """GSM8K rows of path as a GRPO task: each question zero-shot, in the eval prompt's form
    when plain; held out by a hash of the question; rewarded by `gsm8k_correct`."""
    if not path.is_file():
        raise DataError(f"grpo.path: file not found: {path}")
    train_rows, eval_rows, too_long = [], [], 0
    for lineno, question, reference in read_gsm8k(path):
        prompt = encode(question, gsm8k_prompt(question, []))
        if len(prompt) > max_prompt_len:
            too_long += 1  # long questions are dropped, never cut: a cut question has no answer
            continue
        p = Problem(f"{path.name}:{lineno}", prompt, reference)
        (eval_rows if is_val(question, cfg.val_fraction) else train_rows).append(p)
    if not train_rows:
        raise DataError(
            f"{path}: no training rows ({too_long} longer than seq_len - max_new_tokens, "
            f"the rest held out by val_fraction {cfg.val_fraction})"
        )

    def train(step: int) -> list[Problem]:
        rng = np.random.default_rng([cfg.seed, step])
        n = cfg.prompts_per_step
        return [train_rows[i] for i in rng.choice(len(train_rows), n, replace=n > len(train_rows))]

    def reward(p: Problem, ids: list[int]) -> float:
        return float(gsm8k_correct(tok.decode(ids), p.answer))  # the last number, as eval

    info = {"train_rows": len(train_rows), "eval_rows": len(eval_rows), "too_long": too_long}
    return Task("gsm8k", train, eval_rows[: cfg.eval_prompts], reward, info)
