"""Multiple-choice benchmarks (MMLU, CMMLU, C-Eval, ARC, HellaSwag) scored by log-likelihood.

The tasks themselves (YAML files, the data formats, the prompts) are `lmforge/tasks/`
(`multiple_choice.py` there). The model never generates: each choice is a continuation of the
prompt, and the choice with the highest summed log-probability is the answer (`acc`), or the
highest per byte of the choice text (`acc_norm`, as lm-evaluation-harness), which removes the
bias towards short choices.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.eval.scoring import loglikelihood
from lmforge.tasks.multiple_choice import (
    SUBJECT_FORMATS,
    MCTask,
    build_context,
    load_rows,
    load_task,
    target,
)

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
