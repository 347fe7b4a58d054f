"""Tools for the agent loop: plain Python functions, described to the model by a JSON schema
derived from their signature, and the built-in ones (calculator, python, rag).

The one idea: a tool is just a function. Its name, its docstring's first paragraph and its
`Args:` lines, its parameters' type hints and defaults are all the model needs, so `Tool.of(fn)`
writes the OpenAI `{"type": "function", ...}` entry from them and nobody writes a schema by
hand. A tool returns text (what the model reads next); raising is fine: the loop turns the
exception into a tool message the model sees.
"""

from __future__ import annotations

import ast
import inspect
import math
import operator
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import ConfigError

# --------------------------------------------------------------------------- schemas

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def type_schema(hint) -> dict:
    """The JSON schema of one type hint: str, int, float, bool, list[X], dict, Literal[...],
    and `X | None` (Optional). `Annotated[X, {...}]` adds the dict's keys (a `pattern`, a
    `maxLength`) to X's schema. Anything else is refused: the model could not be told its shape."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        extra = {k: v for a in hint.__metadata__ if isinstance(a, dict) for k, v in a.items()}
        return {**type_schema(args[0]), **extra}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple) or hint in (list, tuple):
        return {"type": "array", "items": type_schema(args[0])} if args else {"type": "array"}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:  # Optional[X]: X or null
            return {"anyOf": [type_schema(inner[0]), {"type": "null"}]}
        return {"anyOf": [type_schema(a) for a in args]}
    raise TypeError(f"cannot describe the type {hint!r} as JSON")


_ARG_LINE = re.compile(r"^\s{0,8}(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) from a Google-style docstring: the text before
    `Args:` (blank lines joined), and each `name: text` line under it (continuation lines
    indented deeper are appended)."""
    doc = inspect.cleandoc(doc or "")
    parts = re.split(r"^(?:Args|Arguments|Parameters):\s*$", doc, maxsplit=1, flags=re.M)
    head, rest = parts[0], parts[1] if len(parts) > 1 else ""
    args: dict[str, str] = {}
    last, args_indent = None, 0
    for line in rest.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):  # the next section (Returns:, Raises:) ends the Args
            break
        m = _ARG_LINE.match(line)
        indent = len(line) - len(line.lstrip())
        if m and (last is None or indent <= args_indent):
            last, args_indent = m[1].lstrip("*"), indent
            args[last] = m[2].strip()
        elif last is not None:
            args[last] = f"{args[last]} {line.strip()}".strip()
    description = " ".join(head.split("\n\n")[0].split())
    return description, args


def function_schema(fn: Callable, name: str | None = None) -> dict:
    """OpenAI's tool entry for `fn`: {"type": "function", "function": {name, description,
    parameters}}. A parameter without a default is required; a default is shown as such."""
    description, arg_docs = parse_docstring(fn.__doc__)
    hints = typing.get_type_hints(fn, include_extras=True)
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{fn.__name__}: *args and **kwargs cannot be described to a model")
        if p.name not in hints:
            raise TypeError(f"{fn.__name__}: parameter {p.name!r} needs a type hint")
        prop = type_schema(hints[p.name])
        if p.name in arg_docs:
            prop["description"] = arg_docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        else:
            prop["default"] = p.default
        properties[p.name] = prop
    parameters = {"type": "object", "properties": properties, "required": required}
    parameters["additionalProperties"] = False
    entry = {"name": name or fn.__name__, "description": description, "parameters": parameters}
    return {"type": "function", "function": entry}


@dataclass
class Tool:
    """A function the model may call, with the schema it is shown."""

    name: str
    fn: Callable[..., str]
    schema: dict  # OpenAI's {"type": "function", "function": {...}}

    @classmethod
    def of(cls, fn: Callable, name: str | None = None) -> Tool:
        schema = function_schema(fn, name)
        return cls(schema["function"]["name"], fn, schema)

    @property
    def parameters(self) -> dict:
        return self.schema["function"]["parameters"]

    def __call__(self, arguments: dict) -> str:
        """Run with the model's arguments: an unknown or missing argument is a TypeError whose
        message names it (the loop shows the model that message)."""
        params = self.parameters
        unknown = sorted(set(arguments) - set(params["properties"]))
        if unknown:
            raise TypeError(
                f"unknown argument {unknown[0]!r}; {self.name} takes {list(params['properties'])}"
            )
        missing = [k for k in params["required"] if k not in arguments]
        if missing:
            raise TypeError(f"missing argument {missing[0]!r}")
        return str(self.fn(**arguments))


# --------------------------------------------------------------------------- calculator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION = 500  # characters: a model's arithmetic is short; a long one is a loop
MAX_EXPONENT = 100  # |b| in a ** b: 10 ** 100 is enough for word problems; 9 ** 9 ** 9 is not
MAX_MAGNITUDE = 1e100  # any intermediate value beyond this is refused


class CalculatorError(ValueError):
    pass


def _arith(node: ast.AST) -> int | float:
    """Evaluate an arithmetic AST: numbers, + - * / // % ** and unary signs, nothing else."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_arith(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is too large (limit {MAX_EXPONENT})")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("the result is too large") from None
        if isinstance(value, complex):
            raise CalculatorError("the result is not a real number")
        if abs(value) > MAX_MAGNITUDE:
            raise CalculatorError(f"the result is too large (limit {MAX_MAGNITUDE:g})")
        return value
    what = type(node).__name__
    if isinstance(node, ast.Name):
        what = f"the name {node.id!r}"
    elif isinstance(node, ast.Call):
        what = "a function call"
    raise CalculatorError(f"only numbers and + - * / // % ** ( ) are allowed, not {what}")


def format_number(value: int | float) -> str:
    """12.0 -> "12", 0.1 + 0.2 -> "0.3": a float is shown to 12 significant digits."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("the result is not a finite number")
        if value.is_integer():
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


# What a call may write, enforced by the grammar of a forced call: numbers of at most 9 digits
# joined by at most 8 operators, so that a small model writes an expression rather than a sentence or an
# endless run of digits (both seen with SmolLM2-135M under a plain string schema).
_NUM = r"\({0,3}-?[0-9]{1,9}(\.[0-9]{1,6})?\){0,3}"
ARITHMETIC = {"pattern": rf"^{_NUM}( ?(\*\*|//|[-+*/%]) ?{_NUM}){{0,8}}$"}


def calculator(expression: typing.Annotated[str, ARITHMETIC]) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "(48 / 2) + 48"
    """
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # "1,234" is a thousands separator
    if not text:
        raise CalculatorError("the expression is empty")
    if len(text) > MAX_EXPRESSION:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    return format_number(_arith(tree))


# --------------------------------------------------------------------------- python

PYTHON_TIMEOUT_S = 5.0


class ProgramError(RuntimeError):
    """The program the python tool ran failed; the message is its traceback's tail."""


MAX_OUTPUT = 2000  # characters of stdout the model reads back


# A straight-line program of arithmetic, enforced on a forced call: assignments, then one
# print. Under a plain string schema SmolLM2-135M wrote an endless "1.1.1.1..."; with any text
# per line, endless tuples. Only the forced call is held to it (an "auto" call is free text).
_LINE = r"[-a-z0-9_.+*/%() ]{1,40}"
PROGRAM = {"pattern": rf"^([a-z_][a-z0-9_]{{0,24}} = {_LINE}\n){{0,3}}print\({_LINE}\)$"}


def python(code: typing.Annotated[str, PROGRAM]) -> str:
    """Run a Python program in a sandbox and return what it prints.

    Args:
        code: a complete program using only the standard library; print() the result
    """
    from lmforge.eval.sandbox import run_code

    result = run_code(code, timeout_s=PYTHON_TIMEOUT_S)
    out = result.stdout_tail[-MAX_OUTPUT:]
    # a failed program raises, so the transcript marks the call failed like any tool error
    if result.status == "timeout":
        raise ProgramError(f"the program ran past {PYTHON_TIMEOUT_S:g} s\n{out}".strip())
    if not result.passed:
        raise ProgramError(f"{result.stderr_tail.strip()[-MAX_OUTPUT:]}\n{out}".strip())
    return out.strip() or "(the program printed nothing: print() the result)"


# --------------------------------------------------------------------------- retrieval


def rag_tool(index: str | Path, k: int = 3) -> Tool:
    """A `search` tool over a `lmforge rag index` folder (BM25): the top k chunks, numbered."""
    from lmforge.rag.search import Index

    if not Path(index).exists():
        raise ConfigError(f"--index {index}: no such folder (build one with `lmforge rag index`)")
    opened = Index(index)

    def search(query: typing.Annotated[str, {"maxLength": 200}]) -> str:
        """Search the document index and return the most relevant passages.

        Args:
            query: what to look for, in a few words
        """
        hits = opened.search(query, k)
        if not hits:
            return "no passage matches"
        return "\n".join(f"[{h.rank}] {h.title}: {' '.join(h.text.split())}" for h in hits)

    return Tool.of(search)


BUILTIN = ("calculator", "python", "rag")


def build_tools(
    names: list[str], index: str | None = None, unsafe_exec: bool = False
) -> list[Tool]:
    """The named built-in tools. `rag` needs `index`; `python` needs a sandbox of at least the
    medium level (eval/sandbox.py) unless `unsafe_exec`."""
    tools = []
    for name in names:
        if name not in BUILTIN:
            raise ConfigError(f"--tools: unknown tool {name!r}; choose from {', '.join(BUILTIN)}")
        if name == "calculator":
            tools.append(Tool.of(calculator))
        elif name == "python":
            from lmforge.eval.sandbox import check_isolation

            check_isolation(unsafe_exec)
            tools.append(Tool.of(python))
        else:
            if not index:
                raise ConfigError("--tools rag needs --index INDEX (a `lmforge rag index` folder)")
            tools.append(rag_tool(index))
    if index and "rag" not in names:
        raise ConfigError("--index is only used by the rag tool: add rag to --tools")
    return tools
