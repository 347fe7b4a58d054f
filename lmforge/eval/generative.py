"""Generative tasks: GSM8K (k-shot math, exact match of the final number; its prompt, answer
extraction and check are `lmforge/tasks/gsm8k.py`, shared with GRPO) and HumanEval (code
completion, pass@k with the unit tests run in `sandbox.py`).

The one idea: generation and scoring are separate steps. `gsm8k_outputs`/`humaneval_completions`
turn a model into text; `score_gsm8k`/`score_humaneval` turn text into numbers, so scoring is
tested on hand-written outputs and canonical solutions, without a model.
"""

from __future__ import annotations

import gzip
import json
import math
import secrets
from pathlib import Path

from tqdm import tqdm

from lmforge.eval.sandbox import check_isolation, run_code
from lmforge.infer.generate import fit_prompt, stream_text
from lmforge.tasks.gsm8k import (
    GSM8K_SHOT_POOL,
    GSM8K_STOP,
    extract_answer,
    gsm8k_correct,
    gsm8k_prompt,
)

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def load_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _prompt_ids(tok, text: str) -> list[int]:
    return ([tok.bos_id] if tok.prepend_bos else []) + tok.encode(text)


def _generate(model, tok, text: str, stop, max_new_tokens: int, **sampling) -> tuple[str, bool]:
    """(completion, whether the prompt was cut to fit the context: its oldest tokens go)."""
    ids = _prompt_ids(tok, text)
    fitted = fit_prompt(ids, model.cfg.max_seq_len, max_new_tokens, truncate=True)
    pieces = stream_text(model, tok, fitted, stop=stop, max_new_tokens=max_new_tokens, **sampling)
    return "".join(pieces), len(fitted) < len(ids)


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error sqrt(var / n) (population variance, as multiple_choice)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n / n)


# --- GSM8K


def gsm8k_outputs(
    model, tok, rows: list[dict], shots: list[dict], max_new_tokens: int = 128
) -> tuple[list[str], int]:
    """Greedy answers to rows, and how many prompts had to lose shots or tokens to fit."""
    outputs, cut = [], 0
    for row in tqdm(rows, desc="gsm8k", unit="question", leave=False):
        k = len(shots)
        # drop whole shots before cutting tokens: a prompt starting mid-question confuses more
        while (
            k > 0
            and len(_prompt_ids(tok, gsm8k_prompt(row["question"], shots[:k])))
            + min(max_new_tokens, model.cfg.max_seq_len // 2)
            > model.cfg.max_seq_len
        ):
            k -= 1
        text, truncated = _generate(
            model, tok, gsm8k_prompt(row["question"], shots[:k]), GSM8K_STOP, max_new_tokens
        )
        outputs.append(text)
        cut += truncated or k < len(shots)
    return outputs, cut


def score_gsm8k(rows: list[dict], outputs: list[str]) -> dict:
    """Exact match of the extracted final number against the reference's `#### N`."""
    correct = [
        float(gsm8k_correct(out, extract_answer(row["answer"])))
        for row, out in zip(rows, outputs, strict=True)
    ]
    acc, se = _mean_stderr(correct)
    return {"accuracy": acc, "accuracy_stderr": se, "n": len(rows)}


def evaluate_gsm8k(
    model,
    tok,
    path: str | Path,
    k: int = 4,
    limit: int | None = None,
    max_new_tokens: int = 128,
    shots: list[dict] | None = None,
    log_samples: bool = False,
) -> dict:
    """k-shot GSM8K accuracy on the first `limit` rows of `path`. Shots come from `shots` (the
    train exemplar pool) or else from the file's own first GSM8K_SHOT_POOL rows, which are then
    never scored (see datasets/eval/gsm8k)."""
    rows = load_jsonl(path)
    start = 0
    if shots is None:
        shots, start = rows[:GSM8K_SHOT_POOL], GSM8K_SHOT_POOL
    assert 0 <= k <= len(shots) and start < len(rows), f"k={k} must be at most {len(shots)}"
    rows = rows[start:]
    scored = rows[:limit]
    how = f"first {len(scored)}" if len(scored) < len(rows) else f"all {len(scored)}"
    outputs, cut = gsm8k_outputs(model, tok, scored, shots[:k], max_new_tokens)
    result = score_gsm8k(scored, outputs)
    out = {
        **result,
        "k": k,
        "sample": how,
        "prompts_cut": cut,
        "example_output": outputs[0] if outputs else "",
    }
    if log_samples:
        out["samples"] = [
            {"index": start + i, "question": row["question"], "output": text,
             "pred": extract_answer(text), "gold": extract_answer(row["answer"]),
             "correct": gsm8k_correct(text, extract_answer(row["answer"]))}
            for i, (row, text) in enumerate(zip(scored, outputs))
        ]  # fmt: skip
    return out


# --- HumanEval


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, arXiv:2107.03374):
    1 - C(n-c, k) / C(n, k), as a product: the binomials overflow floats for large n."""
    assert 0 <= c <= n and 1 <= k <= n, f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}"
    if n - c < k:  # every draw of k samples holds a passing one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def humaneval_program(problem: dict, completion: str) -> str:
    """Prompt, completion, the problem's tests, the check, and then a verdict line: only when
    check(...) returns normally does the program read the run's token from stdin and print it.
    A completion that exits first (sys.exit(0), os._exit(0), SystemExit at import or in the
    function) exits 0 without the token, so it fails. The token is not in the program or its
    environment; a completion written to cheat could still read stdin before the tests, or
    return objects whose __eq__ is always true: this stops accidents, not an adversary."""
    return (
        f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
        f"check({problem['entry_point']})\n"
        "import sys as _lmforge_sys\n"
        "_lmforge_sys.stdout.write('\\n' + _lmforge_sys.stdin.readline())\n"
        "_lmforge_sys.stdout.flush()\n"
    )


def run_humaneval(problem: dict, completion: str, timeout_s: float = 5.0) -> str:
    """'passed' | 'failed' | 'timeout' | 'error' | 'exited_early' (exit 0, but the tests never
    finished) for one completion, run in the sandbox with a fresh token on stdin."""
    token = secrets.token_hex(16)
    result = run_code(
        humaneval_program(problem, completion), timeout_s=timeout_s, stdin=f"{token}\n".encode()
    )
    if result.status == "passed" and token not in result.stdout_tail.splitlines()[-1:]:
        return "exited_early"
    return result.status


def humaneval_completions(
    model,
    tok,
    problems: list[dict],
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> tuple[list[list[str]], int]:
    """n completions per problem (greedy at temperature 0, nucleus 0.95 otherwise), and how
    many prompts lost their oldest tokens to fit the context."""
    sampling = {"temperature": temperature, "top_p": 0.95 if temperature > 0 else 1.0}
    completions, cut = [], 0
    for p, problem in enumerate(problems):
        samples = []
        for i in range(n):
            text, truncated = _generate(
                model, tok, problem["prompt"], HUMANEVAL_STOP, max_new_tokens,
                seed=seed + p * n + i, **sampling,
            )  # fmt: skip
            samples.append(text)
            cut += truncated and i == 0
        completions.append(samples)
    return completions, cut


def score_humaneval(
    problems: list[dict], completions: list[list[str]], k=(1,), timeout_s: float = 5.0
) -> dict:
    """pass@k (mean over problems, with its standard error) of the given completions, each run
    with the problem's tests in the sandbox."""
    statuses: dict[str, int] = {}
    per_problem: dict[int, list[float]] = {kk: [] for kk in k}
    for problem, samples in zip(problems, completions, strict=True):
        c = 0
        for completion in samples:
            status = run_humaneval(problem, completion, timeout_s)
            statuses[status] = statuses.get(status, 0) + 1
            c += status == "passed"
        for kk in k:
            per_problem[kk].append(pass_at_k(len(samples), c, kk))
    out: dict = {}
    for kk in k:
        out[f"pass@{kk}"], out[f"pass@{kk}_stderr"] = _mean_stderr(per_problem[kk])
    return {**out, "n": len(problems), "statuses": statuses}


def evaluate_humaneval(
    model,
    tok,
    path: str | Path,
    n: int = 1,
    k=(1,),
    temperature: float | None = None,
    limit: int | None = None,
    max_new_tokens: int = 256,
    timeout_s: float = 5.0,
    seed: int = 0,
    unsafe_exec: bool = False,
) -> dict:
    """HumanEval pass@k from n completions per problem; temperature defaults to 0 (greedy)
    for n = 1 and 0.8 for n > 1, where greedy samples would all be the same. Refuses a sandbox
    below the medium level unless unsafe_exec; the result says which level was in force."""
    assert all(1 <= kk <= n for kk in k), f"every k in {k} must be between 1 and n={n}"
    iso = check_isolation(unsafe_exec)
    if temperature is None:
        temperature = 0.0 if n == 1 else 0.8
    problems = load_jsonl(path)[:limit]
    completions, cut = humaneval_completions(
        model, tok, problems, n, temperature, max_new_tokens, seed
    )
    result = score_humaneval(problems, completions, k, timeout_s)
    return {
        **result,
        "n_samples": n,
        "temperature": temperature,
        "prompts_cut": cut,
        "isolation": {**iso.as_dict(), "unsafe_exec": unsafe_exec},
    }
