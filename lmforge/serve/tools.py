"""Function calling for `lmforge serve`: which tools a request renders and what a forced call
prefills. The text the model writes becomes `tool_calls` in infer/toolcall.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lmforge.serve.protocol import ChatRequest, NamedToolChoice
from lmforge.tokenizer import TOOL_CALL_OPEN


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
    continues it), `schema` is the JSON schema the arguments must follow (None: any object;
    None too when the model still chooses the function)."""

    prefill: str
    name: str | None = None
    schema: dict | None = None


def forced_tool_call(body: ChatRequest) -> ToolForce | None:
    """The seam for constrained decoding: what `tool_choice` forces, or None when the model
    may answer in text (auto, none, no tools). `required` opens a call and lets the model pick
    the name (with one tool it names it); a named choice writes the name too, so that even a
    small model goes on to write arguments.
    A grammar that enforces `schema` on the arguments plugs in here."""
    choice = body.tool_choice
    if not body.tools or choice in (None, "none", "auto"):
        return None
    if choice == "required" and len(body.tools) > 1:
        return ToolForce(prefill=f'{TOOL_CALL_OPEN}\n{{"name": "')
    # a named choice, or "required" with one tool: that tool is the only call there can be
    name = body.tools[0].function.name if choice == "required" else choice.function.name
    tool = next(t for t in body.tools if t.function.name == name)
    prefill = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '
    return ToolForce(prefill=prefill, name=name, schema=tool.function.parameters)
