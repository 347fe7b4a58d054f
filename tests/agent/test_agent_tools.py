"""Tools: the JSON schema derived from a function's signature and docstring, the calculator's
arithmetic and what it refuses, the python and rag tools, and build_tools' errors."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import pytest

from lmforge.agent.tools import (
    ARITHMETIC,
    PROGRAM,
    CalculatorError,
    ProgramError,
    Tool,
    build_tools,
    calculator,
    function_schema,
    parse_docstring,
    python,
    rag_tool,
)
from lmforge.config import ConfigError


def book_flight(
    origin: str,
    seats: int,
    cabin: Literal["economy", "business"] = "economy",
    max_price: float | None = None,
    tags: list[str] = (),
    direct: bool = True,
    code: Annotated[str, {"pattern": "^[A-Z]{3}$"}] = "AMS",
) -> str:
    """Book a flight (a made-up tool for the test).

    Longer notes that are not part of the description.

    Args:
        origin: the city to leave from
        seats (int): how many seats,
            at least one
        cabin: the cabin class
        max_price: the most to pay, in euros
    Returns:
        a booking number
    """
    return "ok"


def test_schema_from_signature_types_defaults_required_and_docstring():
    assert function_schema(book_flight) == {
        "type": "function",
        "function": {
            "name": "book_flight",
            "description": "Book a flight (a made-up tool for the test).",
            "parameters": {
                "type": "object",
                "properties": {
                    "origin": {"type": "string", "description": "the city to leave from"},
                    "seats": {"type": "integer", "description": "how many seats, at least one"},
                    "cabin": {
                        "enum": ["economy", "business"],
                        "description": "the cabin class",
                        "default": "economy",
                    },
                    "max_price": {
                        "anyOf": [{"type": "number"}, {"type": "null"}],
                        "description": "the most to pay, in euros",
                        "default": None,
                    },
                    "tags": {"type": "array", "items": {"type": "string"}, "default": ()},
                    "direct": {"type": "boolean", "default": True},
                    "code": {"type": "string", "pattern": "^[A-Z]{3}$", "default": "AMS"},
                },
                "required": ["origin", "seats"],
                "additionalProperties": False,
            },
        },
    }


def test_docstring_without_args_and_bad_signatures():
    assert parse_docstring("One line.\n\nMore.") == ("One line.", {})
    assert parse_docstring(None) == ("", {})

    def untyped(x):
        return x

    def star(*xs: int) -> str:
        return ""

    with pytest.raises(TypeError, match="'x' needs a type hint"):
        function_schema(untyped)

    def opaque(when: object) -> str:
        return ""

    with pytest.raises(TypeError, match=r"\*args"):
        function_schema(star)
    with pytest.raises(TypeError, match="cannot describe the type <class 'object'> as JSON"):
        function_schema(opaque)


def test_tool_call_checks_arguments():
    tool = Tool.of(book_flight)
    assert tool.name == "book_flight" and tool({"origin": "Oslo", "seats": 2}) == "ok"
    with pytest.raises(TypeError, match="missing argument 'seats'"):
        tool({"origin": "Oslo"})
    with pytest.raises(TypeError, match="unknown argument 'to'"):
        tool({"origin": "Oslo", "seats": 1, "to": "Rome"})


@pytest.mark.parametrize(
    "expression, value",
    [
        ("48 / 2 + 48", "72"),
        ("(3 + 4) * 2", "14"),
        ("2 ** 10", "1024"),
        ("2^3", "8"),
        ("-5 + 2", "-3"),
        ("7 // 2", "3"),
        ("7 % 3", "1"),
        ("0.1 + 0.2", "0.3"),
        ("10 / 4", "2.5"),
        ("1,234 + 1", "1235"),
        ("2 ** -1", "0.5"),
    ],
)
def test_calculator_arithmetic(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize(
    "expression, why",
    [
        ("__import__('os').system('true')", "not a function call"),
        ("x + 1", "not the name 'x'"),
        ("abs(-1)", "not a function call"),
        ("'a' * 3", "not Constant"),
        ("[1] * 3", "not List"),
        ("(1).real", "not Attribute"),
        ("9 ** 9 ** 9", "exponent 387420489 is too large"),
        ("10 ** 101", "exponent 101 is too large"),
        ("10 ** 99 * 10 ** 99", "the result is too large"),
        ("1 / 0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("", "the expression is empty"),
        ("1 +", "not an arithmetic expression"),
        ("1+" * 300 + "1", "longer than 500 characters"),
    ],
)
def test_calculator_refuses_what_is_not_bounded_arithmetic(expression, why):
    with pytest.raises(CalculatorError, match=re.escape(why)):
        calculator(expression)


def test_forced_call_patterns_accept_what_the_tools_run():
    for text in ("48 / 2 + 48", "(3 + 4) * 2", "2**10", "-1.5 * 4"):
        assert re.fullmatch(ARITHMETIC["pattern"], text), text
        calculator(text)
    for text in ("Half of 48 is 24", "1" * 10, "import os"):
        assert not re.fullmatch(ARITHMETIC["pattern"], text), text
    assert re.fullmatch(PROGRAM["pattern"], "half = 48 / 2\nprint(half + 48)")
    assert not re.fullmatch(PROGRAM["pattern"], "import os\nprint(1)")


def _sandbox_or_skip():
    from lmforge.eval.sandbox import LEVELS, MIN_LEVEL, isolation

    level = isolation().level
    if LEVELS.index(level) < LEVELS.index(MIN_LEVEL):
        pytest.skip(f"the sandbox here is only {level!r}")


def test_python_tool_prints_and_reports_errors():
    _sandbox_or_skip()
    assert python("half = 48 / 2\nprint(half + 48)") == "72.0"
    assert python("x = 1") == "(the program printed nothing: print() the result)"
    with pytest.raises(ProgramError, match="ZeroDivisionError: division by zero"):
        python("print(1 / 0)")


def test_rag_tool_searches_an_index(tmp_path):
    pytest.importorskip("bm25s", reason="the rag tool needs bm25s (pip install 'lmforge[rag]')")
    from lmforge.rag.index import build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    # documents made up for the test (the facts are invented)
    (docs / "ships.txt").write_text("The cargo ship Tern was built in Gdynia in 1977.")
    (docs / "bread.txt").write_text("The bakery on Mill Street sells rye bread.")
    build_index([docs], tmp_path / "idx", None, 50, 10)
    tool = rag_tool(tmp_path / "idx")
    assert tool.name == "search" and tool.parameters["required"] == ["query"]
    assert tool.parameters["properties"]["query"]["maxLength"] == 200  # a forced call ends
    out = tool({"query": "Where was the ship Tern built?"})
    assert out.splitlines()[0] == "[1] ships: The cargo ship Tern was built in Gdynia in 1977."
    assert tool({"query": "zeppelin"}) == "no passage matches"


def test_build_tools_errors_name_the_problem(tmp_path):
    assert [t.name for t in build_tools(["calculator"])] == ["calculator"]
    with pytest.raises(ConfigError, match="unknown tool 'shell'; choose from calculator"):
        build_tools(["shell"])
    with pytest.raises(ConfigError, match="rag needs --index"):
        build_tools(["rag"])
    with pytest.raises(ConfigError, match="no such folder"):
        build_tools(["rag"], index=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="--index is only used by the rag tool"):
        build_tools(["calculator"], index=str(tmp_path))
