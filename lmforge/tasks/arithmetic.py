"""The arithmetic task ("7+5" -> "12"): problems drawn from a seeded generator, an exact-match
checker and an optional partial credit, for GRPO to train on and score.

The one idea: every problem is a pure function of (seed, step), and a hash of its text decides
whether it is held out (`is_val`), so training never meets an evaluation problem and a resumed
run draws what the uninterrupted one did.
"""

from __future__ import annotations

import re

import numpy as np

from lmforge.config import ConfigError, GRPOConfig
from lmforge.data.readers import is_val
from lmforge.tasks.base import Encode, Problem, Reply, Task
from lmforge.tokenizer import Tokenizer

EVAL_SEED = 20240205  # the arithmetic held-out set is the same whatever the training seed


def arithmetic_problem(rng: np.random.Generator, digits: int, ops: str) -> tuple[str, int]:
    """One problem ("7+5", 12): operands of 1..digits digits (the count drawn first, so short
    operands are as common as long ones), an operator from ops; "-" keeps results >= 0."""

    def operand() -> int:
        k = int(rng.integers(1, digits + 1))
        return int(rng.integers(0 if k == 1 else 10 ** (k - 1), 10**k))

    a, b, op = operand(), operand(), ops[int(rng.integers(len(ops)))]
    if op == "-" and a < b:
        a, b = b, a
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}", value


def arithmetic_train(
    seed: int, step: int, n: int, digits: int, ops: str, val_fraction: float
) -> list[tuple[str, int]]:
    """Step `step`'s n training problems: drawn from a generator seeded by (seed, step),
    skipping the held-out ones (a hash of the problem text, `is_val`)."""
    rng = np.random.default_rng([seed, step])
    out = []
    for _ in range(1000 * n):
        text, value = arithmetic_problem(rng, digits, ops)
        if not is_val(text, val_fraction):
            out.append((text, value))
            if len(out) == n:
                return out
    raise ConfigError(
        f"grpo: no training problems left with digits={digits}, ops={ops!r}: "
        f"lower grpo.val_fraction ({val_fraction})"
    )


def arithmetic_eval(n: int, digits: int, ops: str, val_fraction: float) -> list[tuple[str, int]]:
    """Up to n distinct held-out problems (fewer when the problem space is small: one-digit
    sums have only 100 problems, about val_fraction of them held out)."""
    rng = np.random.default_rng(EVAL_SEED)
    found: dict[str, int] = {}
    for _ in range(200 * n):
        text, value = arithmetic_problem(rng, digits, ops)
        if is_val(text, val_fraction):
            found[text] = value
            if len(found) == n:
                break
    return list(found.items())


def arithmetic_correct(completion: str, answer: str) -> bool:
    """Exact match of the answer text (surrounding whitespace ignored) with the result's decimal
    string: " 12" is right; "12 apples", "012" and "12.0" are not (only the canonical form
    counts, so the model must learn to say the number and stop)."""
    return completion.strip() == answer


def arithmetic_reward(completion: str, answer: str, partial_credit: float = 0.0) -> float:
    """1 for a correct answer (`arithmetic_correct`); with partial_credit > 0, a wrong answer
    that is an integer alone ("11", not "11 apples") earns partial_credit * (1 - |error| /
    (|result| + 1)), at least 0: near misses beat far ones, so a model with no number sense
    gets a signal from every numeric answer, not only from the rare exact one."""
    if arithmetic_correct(completion, answer):
        return 1.0
    text = completion.strip()
    if not partial_credit or not re.fullmatch(r"-?(0|[1-9][0-9]*)", text):
        return 0.0
    error = abs(int(text) - int(answer))
    return partial_credit * max(0.0, 1.0 - error / (abs(int(answer)) + 1))


def arithmetic_prompt(text: str) -> tuple[str, str]:
    """(user turn, plain text) asking for a problem's result: "What is 7+5?" in a chat, "7+5="
    to complete."""
    return f"What is {text}?", f"{text}="


def arithmetic_task(
    cfg: GRPOConfig, tok: Tokenizer, encode: Encode, reply: Reply, max_prompt_len: int
) -> Task:
    """The arithmetic task of cfg (digits, ops, val_fraction, partial_credit), its prompts
    encoded by encode and its cold-start targets by reply."""

    def problem(text: str, value: int) -> Problem:
        p = Problem(text, encode(*arithmetic_prompt(text)), str(value))
        if len(p.prompt_ids) > max_prompt_len:
            raise ConfigError(
                f"grpo: the prompt for {text!r} has {len(p.prompt_ids)} tokens; "
                f"seq_len - max_new_tokens leaves room for {max_prompt_len}"
            )
        return p

    def train(step: int) -> list[Problem]:
        drawn = arithmetic_train(
            cfg.seed, step, cfg.prompts_per_step, cfg.digits, cfg.ops, cfg.val_fraction
        )
        return [problem(t, v) for t, v in drawn]

    def target(p: Problem) -> list[int]:  # the answer as the policy would write it, then stop
        return reply(arithmetic_prompt(p.text)[0], p.answer)

    held_out = arithmetic_eval(cfg.eval_prompts, cfg.digits, cfg.ops, cfg.val_fraction)
    return Task(
        "arithmetic",
        train,
        [problem(t, v) for t, v in held_out],
        lambda p, ids: arithmetic_reward(tok.decode(ids), p.answer, cfg.partial_credit),
        target=target,
    )
