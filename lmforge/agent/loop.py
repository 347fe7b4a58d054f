"""The agent loop: a chat model calls tools until it answers in text, within a step limit.

The one idea: the conversation is OpenAI messages, re-rendered with the tools every step
(infer/chat.py); a step is one generation. Its `<tool_call>` blocks (infer/toolcall.py) run in
order, each result, or the error a bad call raised, goes back as a `role: tool` message, and
the next step reads them. A step without calls is the answer. The transcript records every
message with its step and timing, so a run can be read back call by call.

Small models rarely call a tool on their own: `tool_choice="required-first"` forces the first
step to be a call by prefilling `<tool_call>` and, where llguidance is installed, constraining
the rest to `{"name": <a tool>, "arguments": <its schema>}`; later steps are free ("auto").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.agent.tools import Tool
from lmforge.config import ConfigError
from lmforge.infer.toolcall import parse_tool_calls
from lmforge.infer.untrusted import NOTE, Defence
from lmforge.tokenizer import TOOL_CALL_CLOSE

TOOL_CHOICES = ("auto", "required-first")
# a model that writes a tool's response tags is making one up (the tool answers, not the model;
# SmolLM2-135M loops on the opening one and echoes a result followed by the closing one): its
# turn ends there
STOP = ("<tool_response>", "</tool_response>")
MAX_RESULT = 2000  # characters of a tool's result the model reads back
SYSTEM = (
    "You are a helpful assistant. Call a tool when it helps; when you know the answer, "
    "reply with it in plain text."
)

# reply(messages, tools, forced) -> (text, info): one generation. `tools` are the OpenAI
# entries to render; `forced`: the text must be a call. `info` holds numbers for the transcript.
Reply = Callable[[list[dict], list[dict], bool], tuple[str, dict]]


class ContextFull(Exception):
    """The conversation no longer fits the model's context: the loop stops there."""


@dataclass
class AgentResult:
    answer: str | None  # None: no text answer (the step limit, or the context, ran out)
    steps: int  # generations made
    stopped: str  # "answer" | "step_limit" | "context"
    transcript: list[dict] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # the final conversation (OpenAI)

    def as_dict(self) -> dict:
        keys = ("answer", "steps", "stopped", "transcript")
        return {k: getattr(self, k) for k in keys}


def run_tool_call(call: dict, tools: dict[str, Tool]) -> tuple[str, bool]:
    """Run one OpenAI-shaped call: (result text, whether it failed). Every failure (unknown
    tool, arguments that are not a JSON object, the tool raising) becomes text for the model."""
    name, raw = call["function"]["name"], call["function"]["arguments"]
    if name not in tools:
        return f"error: there is no tool {name!r}; the tools are {', '.join(tools)}", True
    try:
        arguments = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        return f"error: the arguments are not valid JSON ({e})", True
    if not isinstance(arguments, dict):
        return "error: the arguments must be a JSON object", True
    try:
        return tools[name](arguments)[:MAX_RESULT], False
    except Exception as e:  # a tool's bug or bad input is the model's to read, never a crash
        return f"error: {type(e).__name__}: {e}", True


def run_agent(
    reply: Reply,
    question: str,
    tools: list[Tool],
    max_steps: int = 5,
    tool_choice: str = "auto",
    system: str | None = SYSTEM,
    defence: Defence = Defence(),
) -> AgentResult:
    """Answer `question`, calling `tools` for at most `max_steps` generations. Tool results
    are untrusted text: `defence` holds back those the injection rules flag and spotlights the
    rest (infer/untrusted.py)."""
    if max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
    if tool_choice not in TOOL_CHOICES:
        raise ConfigError(f"--tool-choice must be one of {', '.join(TOOL_CHOICES)}")
    by_name = {t.name: t for t in tools}
    entries = [t.schema for t in tools]
    if system and defence.spotlight:
        system = f"{system} {NOTE}"
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    transcript = [{"step": 0, **m} for m in messages]
    for step in range(1, max_steps + 1):
        forced = bool(tools) and tool_choice == "required-first" and step == 1
        t0 = time.perf_counter()
        try:
            text, info = reply(messages, entries, forced)
        except ContextFull as e:
            transcript.append({"step": step, "role": "agent", "stopped": "context", "why": str(e)})
            return AgentResult(None, step - 1, "context", transcript, messages)
        content, calls = parse_tool_calls(text)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        messages.append(message)
        seconds = round(time.perf_counter() - t0, 4)
        record = {"step": step, **message, "text": text, "forced": forced, "seconds": seconds}
        transcript.append({**record, **info})
        if not calls:
            return AgentResult((content or "").strip(), step, "answer", transcript, messages)
        for call in calls:
            t0 = time.perf_counter()
            result, failed = run_tool_call(call, by_name)
            if rules := defence.flagged(result):
                result = (
                    f"(held back: the tool result looked like instructions: {', '.join(rules)})"
                )
            result = defence.wrap(result)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            transcript.append({
                "step": step, "role": "tool", "tool_call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                "content": result, "error": failed,
                "seconds": round(time.perf_counter() - t0, 4),
            })  # fmt: skip
    transcript.append({"step": max_steps, "role": "agent", "stopped": "step_limit"})
    return AgentResult(None, max_steps, "step_limit", transcript, messages)


# --------------------------------------------------------------------------- a real model


def model_reply(model, tok, max_new_tokens: int = 256, **sampling) -> Reply:
    """The Reply of a loaded model: render with the tools (chat template, or the Hermes way),
    generate, and for a forced step prefill `<tool_call>` and constrain the call to the tools'
    schemas (unconstrained, after `{"name": "`, where llguidance is not installed)."""
    from lmforge.infer.chat import chat_prompt_ids, stop_ids
    from lmforge.infer.generate import stream_text

    stops = stop_ids(tok)

    def reply(messages: list[dict], tools: list[dict], forced: bool) -> tuple[str, dict]:
        prefill, constraint = "", None
        if forced:
            prefill, constraint = _forced_call(tok, model.cfg.vocab_size, stops, tools)
        ids = chat_prompt_ids(tok, messages, tools or None) + tok.encode(prefill)
        room = model.cfg.max_seq_len - len(ids)
        if room < 1:
            raise ContextFull(
                f"the conversation has {len(ids)} tokens, the context {room + len(ids)}"
            )
        n = min(max_new_tokens, room)
        text = "".join(
            stream_text(model, tok, ids, stop=STOP, stop_ids=stops, max_new_tokens=n,
                        constraint=constraint, **sampling)
        )  # fmt: skip
        info = {"prompt_tokens": len(ids), "new_tokens": len(tok.encode(text))}  # re-encoded
        if forced and TOOL_CALL_CLOSE not in text:
            text += f"\n{TOOL_CALL_CLOSE}"  # the grammar ends at the object's closing brace
        return prefill + text, info

    return reply


def _forced_call(tok, vocab_size: int, stops, tools: list[dict]):
    """(prefill, constraint) that make the next text a call to one of `tools` (OpenAI entries):
    the server's forced call (infer/toolcall.py:forced_call); no constraint without llguidance."""
    from lmforge.infer.constrain import Constraint
    from lmforge.infer.toolcall import forced_call

    prefill, grammar = forced_call({t["function"]["name"]: t["function"].get("parameters")
                                    for t in tools})  # fmt: skip
    return prefill, Constraint(tok, grammar, vocab_size, stops) if grammar else None
