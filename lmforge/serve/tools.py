"""Function calling for `lmforge serve`: which tools a request renders and what a forced call
prefills. The text the model writes becomes `tool_calls` in infer/toolcall.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lmforge.config import ConfigError
from lmforge.infer.constrain import has_llguidance, json_grammar, tool_call_grammar
from lmforge.serve.protocol import APIError, ChatRequest, NamedToolChoice
from lmforge.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


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
    tool's schema under a grammar. A schema the grammar compiler refuses is a 400 naming it."""
    choice = body.tool_choice
    if not body.tools or choice in (None, "none", "auto"):
        return None
    if choice == "required" and len(body.tools) > 1:
        prefill, name = f'{TOOL_CALL_OPEN}\n{{"name": "', None
        schemas = {t.function.name: t.function.parameters for t in body.tools}
    else:  # a named choice, or "required" with one tool: the only call there can be
        name = body.tools[0].function.name if choice == "required" else choice.function.name
        tool = next(t for t in body.tools if t.function.name == name)
        prefill = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '
        schemas = {name: tool.function.parameters}
    return ToolForce(prefill=prefill, name=name, grammar=_call_grammar(body, schemas, name))


def _call_grammar(body: ChatRequest, schemas: dict, name: str | None) -> str | None:
    """The forced call's grammar, or None without llguidance (forcing worked before there
    were grammars and still does, unconstrained)."""
    if not has_llguidance():
        return None
    try:
        return tool_call_grammar(schemas, name is not None, f"\n{TOOL_CALL_CLOSE}")
    except ConfigError as e:
        names = [t.function.name for t in body.tools]
        culprit = next((n for n in schemas if not _compiles(schemas[n])), None)
        i = names.index(culprit) if culprit is not None else None
        param = "tools" if i is None else f"tools[{i}].function.parameters"
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None


def _compiles(schema: dict | None) -> bool:
    try:
        json_grammar(schema)
        return True
    except ConfigError:
        return False
