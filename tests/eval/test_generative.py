"""GSM8K scoring (its answer extraction: tests/tasks/test_gsm8k.py), pass@k against brute
force, HumanEval through the sandbox, and both tasks end to end on the micro model."""

import dataclasses
import itertools
import math
from pathlib import Path

import pytest

from lmforge.eval import sandbox
from lmforge.eval.generative import (
    evaluate_gsm8k,
    evaluate_humaneval,
    load_jsonl,
    pass_at_k,
    run_humaneval,
    score_gsm8k,
    score_humaneval,
)
from lmforge.tasks.gsm8k import GSM8K_SHOT_POOL, extract_answer, worked_answer

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO / "datasets/eval/gsm8k/train_head300.jsonl.gz"
HUMANEVAL = REPO / "datasets/eval/humaneval/HumanEval.jsonl.gz"


def test_gsm8k_references_all_parse_and_worked_answers_score_one():
    rows = load_jsonl(GSM8K)
    assert len(rows) == 300 and all(extract_answer(r["answer"]) for r in rows)
    assert "<<" not in worked_answer(rows[0]["answer"])
    assert worked_answer(rows[0]["answer"]).endswith("The answer is 72.")
    result = score_gsm8k(rows[:10], [worked_answer(r["answer"]) for r in rows[:10]])
    assert result == {"accuracy": 1.0, "accuracy_stderr": 0.0, "n": 10}


def test_score_gsm8k_accuracy_and_stderr():
    rows = [
        {"answer": "#### 4"},
        {"answer": "#### 1,000"},
        {"answer": "#### 2"},
        {"answer": "#### 7"},
    ]
    outputs = ["The answer is 4.", "That is $1000.", "no idea", "The answer is 8."]
    result = score_gsm8k(rows, outputs)
    assert result["accuracy"] == 0.5 and result["n"] == 4
    assert result["accuracy_stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4))


def _pass_at_k_brute_force(n, c, k):
    """The fraction of k-subsets of n samples (c of them passing) that hold a passing one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_matches_brute_force_and_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute_force(n, c, k), abs=1e-12)
        assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, n) == 1.0


def test_pass_at_k_is_stable_for_many_samples():
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert pass_at_k(2000, 3, 100) == pytest.approx(1 - math.comb(1997, 100) / math.comb(2000, 100))


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = load_jsonl(HUMANEVAL)[:3]
    assert len(load_jsonl(HUMANEVAL)) == 164
    right = score_humaneval(problems, [[p["canonical_solution"]] for p in problems])
    assert right["pass@1"] == 1.0 and right["n"] == 3 and right["statuses"] == {"passed": 3}
    samples = [
        [p["canonical_solution"], "    return None\n", "    while True:\n        pass\n"]
        for p in problems
    ]
    mixed = score_humaneval(problems, samples, k=(1, 2, 3), timeout_s=1.0)
    assert mixed["pass@1"] == pytest.approx(1 / 3)
    assert mixed["pass@2"] == pytest.approx(2 / 3)
    assert mixed["pass@3"] == 1.0
    assert mixed["statuses"] == {"passed": 3, "failed": 3, "timeout": 3}


# made-up problem: the tests pass only if f() returns 1
ONE = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
EARLY_EXITS = {
    "sys.exit in the function": "    import sys\n    sys.exit(0)\n",
    "os._exit in the function": "    import os\n    os._exit(0)\n",
    "SystemExit in the function": "    raise SystemExit\n",
    "sys.exit at import": "    return 1\nimport sys\nsys.exit(0)\n",
    "os._exit at import": "    return 2\nimport os\nos._exit(0)\n",
    "SystemExit(0) at import": "    return 1\nraise SystemExit(0)\n",
}
WEAKEST = dataclasses.replace(
    sandbox._setup(), prefix=(), namespaces=False, uid=None, setuid_in_child=False, seccomp=False
)


@pytest.mark.parametrize("weakest", [False, True], ids=["strongest", "weakest"])
def test_humaneval_exit_before_the_tests_is_not_a_pass(weakest, monkeypatch):
    if weakest:
        monkeypatch.setattr(sandbox, "_setup", lambda: WEAKEST)
    assert run_humaneval(ONE, "    return 1\n") == "passed"
    assert run_humaneval(ONE, "    return 2\n") == "failed"
    for name, completion in EARLY_EXITS.items():
        assert run_humaneval(ONE, completion, timeout_s=5) == "exited_early", name
    result = score_humaneval([ONE], [list(EARLY_EXITS.values())], k=(1, 6))
    assert result["pass@6"] == 0.0 and result["statuses"] == {"exited_early": 6}


def test_evaluate_humaneval_refuses_a_weak_sandbox(monkeypatch):
    from lmforge.config import ConfigError

    monkeypatch.setattr(sandbox, "_setup", lambda: WEAKEST)
    with pytest.raises(ConfigError, match="--unsafe-exec"):
        evaluate_humaneval(None, None, HUMANEVAL, limit=1)


@pytest.fixture(scope="module")
def micro_model(micro_pretrained):
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    _, model_dir = micro_pretrained
    return load_model(model_dir).eval(), Tokenizer.load(model_dir)


def test_evaluate_gsm8k_end_to_end(micro_model):
    model, tok = micro_model
    result = evaluate_gsm8k(model, tok, GSM8K, k=2, limit=2, max_new_tokens=8)
    assert result["n"] == 2 and result["k"] == 2 and 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy_stderr"] >= 0.0
    assert result["prompts_cut"] == 2  # two worked examples do not fit in 64 tokens
    assert GSM8K_SHOT_POOL >= 2


def test_evaluate_humaneval_end_to_end(micro_model):
    model, tok = micro_model
    greedy = evaluate_humaneval(model, tok, HUMANEVAL, limit=2, max_new_tokens=8, timeout_s=2)
    assert greedy["n"] == 2 and greedy["n_samples"] == 1 and greedy["temperature"] == 0.0
    assert 0.0 <= greedy["pass@1"] <= 1.0 and sum(greedy["statuses"].values()) == 2
    assert greedy["isolation"]["level"] == sandbox.isolation().level
    assert greedy["isolation"]["unsafe_exec"] is False
    sampled = evaluate_humaneval(
        model, tok, HUMANEVAL, n=2, k=(1, 2), limit=1, max_new_tokens=8, timeout_s=2
    )
    assert sampled["temperature"] == 0.8 and {"pass@1", "pass@2"} <= sampled.keys()
    assert sum(sampled["statuses"].values()) == 2
