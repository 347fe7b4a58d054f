"""Tool calls written as text, parsed: the Hermes / Qwen2.5 convention, `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>` (see tokenizer.py), turned into OpenAI's `tool_calls`, whole or
streamed. The server and the agent loop both read a model's calls here.

The one idea: one incremental parser turns text pieces into deltas: content outside the tags,
and per call an opening delta (id, name) once the name is known, then the arguments as they
arrive. A whole response is the same parser fed the whole text, so streamed and non-streamed
answers cannot disagree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from lmforge.infer.constrain import has_llguidance, tool_call_grammar
from lmforge.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


def forced_call(schemas: dict[str, dict | None]) -> tuple[str, str | None]:
    """(prefill, grammar) that make the next text a call to one of `schemas` (tool name ->
    JSON schema of its arguments): the prefill opens the call, and names the tool when there is
    one; the grammar holds the rest (the name, arguments valid for that tool, the closing tag).
    The grammar is None without llguidance: the prefill alone still makes a call. A schema the
    grammar compiler refuses raises ConfigError. Used by the server's tool_choice and the
    agent's forced steps."""
    name = next(iter(schemas)) if len(schemas) == 1 else None
    if name is None:
        prefill = f'{TOOL_CALL_OPEN}\n{{"name": "'
    else:
        prefill = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '
    if not has_llguidance():
        return prefill, None
    return prefill, tool_call_grammar(schemas, name is not None, f"\n{TOOL_CALL_CLOSE}")


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _held(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could begin `marker` (kept back a piece)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _arguments_end(text: str) -> int:
    """Where a call's arguments end in `text`, the rest of the object after them: the
    closing brace of {"name", "arguments"} and whitespace."""
    stripped = text.rstrip()
    return len(stripped) - 1 if stripped.endswith("}") else len(stripped)


@dataclass
class ToolCallParser:
    """Generated text in, OpenAI deltas out: {"content": str} or {"tool_calls": [...]}."""

    calls: list[dict] = field(default_factory=list)  # the finished message's tool_calls
    _buf: str = ""  # text not yet turned into deltas
    _in_call: bool = False
    _sent: int = 0  # within a call whose head is parsed: argument characters sent

    def feed(self, text: str) -> list[dict]:
        self._buf += text
        out: list[dict] = []
        while True:
            before = (self._buf, self._in_call, self._sent)
            out += self._call_step() if self._in_call else self._text_step()
            if (self._buf, self._in_call, self._sent) == before:
                return out

    def finish(self) -> list[dict]:
        """The deltas held back at the end of the text: a call the text cut off (max_tokens,
        a stop string) ends where the text does."""
        if self._in_call and self._sent < 0:  # cut off before its head: whole, or text
            body, self._buf, self._in_call = self._buf, "", False
            return self._whole_call(body) or [{"content": TOOL_CALL_OPEN + body}]
        out = self.feed(TOOL_CALL_CLOSE) if self._in_call else []
        if self._buf.strip() or (self._buf and not self.calls):
            out.append({"content": self._buf})
        self._buf = ""
        return out

    def _text_step(self) -> list[dict]:
        at = self._buf.find(TOOL_CALL_OPEN)
        if at >= 0:
            text, self._buf = self._buf[:at], self._buf[at + len(TOOL_CALL_OPEN) :]
            self._in_call, self._sent = True, -1
            return [{"content": text}] if text.strip() else []
        keep = _held(self._buf, TOOL_CALL_OPEN)
        if not self._buf[: len(self._buf) - keep].strip():  # whitespace may only lead to a call
            return []
        text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        return [{"content": text}]

    def _call_step(self) -> list[dict]:
        end = self._buf.find(TOOL_CALL_CLOSE)
        body = self._buf if end < 0 else self._buf[:end]
        out: list[dict] = []
        if self._sent < 0:  # the head is not parsed yet
            head = _HEAD.match(body)
            if head is None:
                if end < 0:
                    return []
                self._buf, self._in_call = self._buf[end + len(TOOL_CALL_CLOSE) :], False
                text = f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"
                return self._whole_call(body) or [{"content": text}]
            out.append(self._open(json.loads(f'"{head.group(1)}"')))
            self._buf, body, self._sent = self._buf[head.end() :], body[head.end() :], 0
            end = -1 if end < 0 else end - head.end()
        if self._sent == 0:  # the arguments start at their first non-blank character
            blank = len(body) - len(body.lstrip())
            self._buf, body = self._buf[blank:], body[blank:]
            end = -1 if end < 0 else end - blank
        if end < 0:  # keep back what may be the object's closing brace or the closing tag
            ready = _arguments_end(body[: len(body) - _held(body, TOOL_CALL_CLOSE)])
        else:
            ready = _arguments_end(body)
        if ready > self._sent:
            out.append(self._arguments(body[self._sent : ready]))
            self._sent = ready
        if end >= 0:
            self._buf, self._in_call = self._buf[end + len(TOOL_CALL_CLOSE) :].lstrip("\n"), False
        return out

    def _whole_call(self, body: str) -> list[dict] | None:
        """A call whose head did not stream (another key order) parsed whole; None when it
        is not a call at all (the caller keeps it as text)."""
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return None
        arguments = obj.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return [self._open(obj["name"]), self._arguments(text)]

    def _open(self, name: str) -> dict:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function"}
        call["function"] = {"name": name, "arguments": ""}
        self.calls.append(call)
        delta = {"index": len(self.calls) - 1, **call, "function": dict(call["function"])}
        return {"tool_calls": [delta]}

    def _arguments(self, text: str) -> dict:
        self.calls[-1]["function"]["arguments"] += text
        index = len(self.calls) - 1
        return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """A whole generation as (content, tool_calls): content None when there is no text
    outside the calls, as OpenAI answers a pure call."""
    parser = ToolCallParser()
    deltas = parser.feed(text) + parser.finish()
    content = "".join(d.get("content", "") for d in deltas)
    return (content.strip() or None) if parser.calls else content, parser.calls
