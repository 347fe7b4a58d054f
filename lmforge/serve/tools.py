"""Function calling for `lmforge serve`: which tools a request renders and what a forced call
prefills. The text the model writes becomes `tool_calls` in infer/toolcall.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import ConfigError
from lmforge.infer.constrain import json_grammar
from lmforge.infer.toolcall import forced_call
from lmforge.serve.protocol import APIError, ChatRequest, NamedToolChoice


def request_tools(body: ChatRequest) -> list[dict] | None:
    """The tools to render (OpenAI's dicts), or None: `tool_choice: none` renders none, so
    the model answers in text as if it had no tools; a named choice renders only that one."""
    if not body.tools or body.tool_choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if isinstance(body.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t["function"]["name"] == body.tool_choice.function.name]
    return tools


@dataclass
class ToolForce:
    """How a forced call is made: `prefill` is written after the generation prompt (the model
    continues it) and `grammar` holds the rest (the name when not given, arguments valid
    against the tool's JSON schema, the closing tag); None when llguidance is not installed
    (the prefill alone still makes a call, but its arguments may not parse)."""

    prefill: str
    name: str | None = None
    grammar: str | None = None


def forced_tool_call(body: ChatRequest) -> ToolForce | None:
    """What `tool_choice` forces, or None when the model may answer in text (auto, none, no
    tools). `required` opens a call and lets the model pick the name among the tools (with one
    tool it names it); a named choice writes the name too. The arguments then follow the
    tool's schema under a grammar (infer/toolcall.py:forced_call). A schema the grammar
    compiler refuses is a 400 naming it."""
    choice = body.tool_choice
    if not body.tools or choice in (None, "none", "auto"):
        return None
    if choice == "required":  # with one tool, the only call there can be: it is named
        schemas = {t.function.name: t.function.parameters for t in body.tools}
    else:
        tool = next(t for t in body.tools if t.function.name == choice.function.name)
        schemas = {tool.function.name: tool.function.parameters}
    try:
        prefill, grammar = forced_call(schemas)
    except ConfigError as e:
        names = [t.function.name for t in body.tools]
        culprit = next((n for n in schemas if not _compiles(schemas[n])), None)
        param = "tools" if culprit is None else f"tools[{names.index(culprit)}].function.parameters"
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None
    name = next(iter(schemas)) if len(schemas) == 1 else None
    return ToolForce(prefill=prefill, name=name, grammar=grammar)


def _compiles(schema: dict | None) -> bool:
    try:
        json_grammar(schema)
        return True
    except ConfigError:
        return False
