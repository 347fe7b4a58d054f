"""The arithmetic task: seeded problems disjoint from the held-out ones, the exact-match
checker, and partial credit."""

import pytest

from lmforge.config import ConfigError, GRPOConfig
from lmforge.tasks.arithmetic import (
    arithmetic_correct,
    arithmetic_eval,
    arithmetic_reward,
    arithmetic_train,
)


def test_arithmetic_problems_are_seeded_correct_and_disjoint_from_held_out():
    a = arithmetic_train(7, 3, 50, 2, "+-*", 0.2)
    assert a == arithmetic_train(7, 3, 50, 2, "+-*", 0.2)  # a pure function of (seed, step)
    assert a != arithmetic_train(7, 4, 50, 2, "+-*", 0.2)
    assert a != arithmetic_train(8, 3, 50, 2, "+-*", 0.2)
    for text, value in a:
        assert eval(text) == value >= 0  # "-" keeps the larger operand first
        operands = text.replace("+", " ").replace("-", " ").replace("*", " ").split()
        assert all(1 <= len(x) <= 2 and (len(x) == 1 or x[0] != "0") for x in operands)
    assert {c for text, _ in a for c in text if not c.isdigit()} == set("+-*")
    held_out = arithmetic_eval(500, 2, "+-*", 0.2)
    assert len(held_out) == len({t for t, _ in held_out}) == 500  # distinct
    assert all(eval(t) == v for t, v in held_out)
    train = {t for step in range(40) for t, _ in arithmetic_train(7, step, 50, 2, "+-*", 0.2)}
    assert not train & {t for t, _ in held_out}
    # one-digit sums: 100 problems in all, about a fifth held out, every one of them found
    small = dict(arithmetic_eval(64, 1, "+", 0.2))
    assert 10 <= len(small) <= 30
    assert len(small) == sum(t in small for t in (f"{x}+{y}" for x in range(10) for y in range(10)))
    train_small = {t for s in range(100) for t, _ in arithmetic_train(1, s, 8, 1, "+", 0.2)}
    assert len(train_small) + len(small) == 100 and not train_small & small.keys()


@pytest.mark.parametrize(
    "text,ok",
    [
        ("12", True),
        (" 12", True),
        ("12\n", True),
        ("\n 12 ", True),
        ("12 apples", False),  # the answer is the number alone
        ("012", False),  # only the canonical decimal string counts
        ("12.0", False),
        ("+12", False),
        ("1 2", False),
        ("The answer is 12", False),
        ("", False),
        ("21", False),
    ],
)
def test_arithmetic_checker_is_an_exact_match(text, ok):
    assert arithmetic_correct(text, "12") is ok


def test_partial_credit_ranks_near_misses_below_a_correct_answer():
    assert arithmetic_reward(" 12", "12", 0.5) == 1.0
    assert arithmetic_reward("11", "12", 0.5) == pytest.approx(0.5 * (1 - 1 / 13))
    assert arithmetic_reward("6\n", "12", 0.5) == pytest.approx(0.5 * (1 - 6 / 13))
    assert arithmetic_reward("30", "12", 0.5) == 0.0  # further off than the result itself
    assert arithmetic_reward("1", "0", 0.5) == 0.0
    assert arithmetic_reward("11 apples", "12", 0.5) == 0.0  # only an integer alone earns any
    assert arithmetic_reward("011", "12", 0.5) == 0.0
    assert arithmetic_reward("11", "12") == 0.0  # off by default: exact match only
    with pytest.raises(ConfigError, match="partial_credit must be in"):
        GRPOConfig(partial_credit=1.0)
