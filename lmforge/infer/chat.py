"""Conversations with a model: prompt building with the chat template, a context budget, and the
interactive terminal chat (`lmforge chat`).

The one idea: the conversation is kept as messages and re-rendered with the tokenizer's chat
template every turn, so the prompt is exactly what SFT trained on. When it outgrows the context
the oldest turns fall out (never the system prompt) and the user is told; a memory
(infer/memory.py: `--memory summary|retrieve`) keeps them as a note instead of losing them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.infer.generate import fit_prompt, stream_text
from lmforge.tokenizer import Tokenizer, hermes_messages, template_takes_tools


def stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    """Generation ends at EOS or at the end-of-turn marker, whichever the model emits (the
    same ids a saved checkpoint's generation_config.json lists for other tools)."""
    return tok.stop_ids()


def chat_prompt_ids(tok: Tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """BOS, then the conversation rendered with the generation prompt (as SFT encodes it).
    `tools` (OpenAI's list) and messages with `tool_calls` or the `tool` role go through the
    template itself when it takes `tools`, else the Hermes way (`hermes_messages`)."""
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        if not template_takes_tools(tok.chat_template):
            messages, tools = hermes_messages(messages, tools), None
    prefix = tok.chat_prefix(messages)
    return prefix + tok.encode_chat(messages, add_generation_prompt=True, tools=tools or None)


def fit_history(
    tok: Tokenizer, messages: list[dict], max_prompt_tokens: int, tools: list | None = None
) -> tuple[list[dict], int]:
    """Drop the oldest non-system messages (a user turn with its reply) until the prompt fits.
    Returns the kept messages and how many were dropped. The system prompt and the newest user
    message are never dropped; if those alone do not fit, that is an error. `tools` are
    rendered with the messages (they take room too)."""
    kept = list(messages)
    dropped = 0
    while len(chat_prompt_ids(tok, kept, tools)) > max_prompt_tokens:
        first = 1 if kept and kept[0]["role"] == "system" else 0
        if len(kept) - first <= 1:
            raise ConfigError(
                f"the system prompt and your message need more than {max_prompt_tokens} tokens "
                "(the context minus the room kept for the answer); shorten them"
            )
        n = 2 if len(kept) - first > 2 and kept[first + 1]["role"] == "assistant" else 1
        del kept[first : first + n]
        dropped += n
    return kept, dropped


def answer(model, tok: Tokenizer, messages: list[dict], **sampling) -> Iterator[str]:
    """Stream the assistant's reply to the conversation (text pieces)."""
    ids = chat_prompt_ids(tok, messages)
    ids = fit_prompt(ids, model.cfg.max_seq_len, sampling.get("max_new_tokens", 64), False)
    return stream_text(model, tok, ids, stop_ids=stop_ids(tok), **sampling)


# --------------------------------------------------------------------------- terminal chat

HELP = """commands: /reset (forget the conversation), /system TEXT (set the system prompt and
reset), /save FILE (write the conversation as JSON), /help, /quit (or Ctrl-D)"""


def run_chat(
    model,
    tok: Tokenizer,
    system: str = "",
    reserve: int = 128,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda s: (sys.stdout.write(s), sys.stdout.flush()),
    memory=None,
    context: int | None = None,
    **sampling,
) -> None:
    """The read-answer loop. With no chat template (a base model) each line is continued as
    plain text instead. `reserve` tokens of the context are kept free for the answer.
    `memory` (infer/memory.py's Memory; None = drop) decides what becomes of the turns that
    fall out; `context` uses fewer tokens than the model's context (default: all of them)."""
    chat_mode = bool(tok.chat_template)
    system_msgs = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    n_ctx = min(context or model.cfg.max_seq_len, model.cfg.max_seq_len)
    budget = n_ctx - min(reserve, n_ctx // 2)
    sampling["max_new_tokens"] = min(sampling.get("max_new_tokens", reserve), reserve)
    if not chat_mode:
        write("(no chat template: base model, plain completion mode)\n")
    write(HELP + "\n")
    while True:
        try:
            line = read("you> " if chat_mode else "prompt> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/help":
            write(HELP + "\n")
            continue
        if text == "/reset":
            history = []
            _forget(memory)
            write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip()
            system_msgs = [{"role": "system", "content": system}] if system else []
            history = []
            _forget(memory)
            write(f"(system prompt {'set' if system else 'removed'}; conversation cleared)\n")
            continue
        if text.startswith("/save"):
            dest = text[len("/save") :].strip()
            if not dest:
                write("(usage: /save FILE)\n")
                continue
            try:
                save_conversation(system_msgs + history, dest)
            except OSError as e:  # a directory, a missing folder, no permission: keep chatting
                write(f"(error: cannot save to {dest}: {e.strerror or e}; nothing was lost)\n")
                continue
            write(f"(saved {len(system_msgs + history)} messages to {dest})\n")
            continue
        if text.startswith("/"):
            write(f"(unknown command {text.split()[0]}; /help lists them)\n")
            continue
        try:
            if chat_mode:
                history.append({"role": "user", "content": line})
                prompt, history = _fit(tok, system_msgs, history, budget, memory, write)
                write("assistant> ")
                reply = "".join(_echo(answer(model, tok, prompt, **sampling), write))
                history.append({"role": "assistant", "content": reply})
            else:
                bos = [tok.bos_id] if tok.prepend_bos else []
                ids = fit_prompt(bos + tok.encode(line), model.cfg.max_seq_len, 1, True)
                write(line)
                for piece in stream_text(model, tok, ids, **sampling):
                    write(piece)
        except ConfigError as e:
            if chat_mode and history and history[-1]["role"] == "user":
                history.pop()
            write(f"(error: {e})\n")
            continue
        write("\n")


FELL_OUT = {
    "drop": "dropped the {n} oldest messages",
    "summary": "summarised the {n} oldest messages into a note",
    "retrieve": "set the {n} oldest messages aside for retrieval",
}


def _fit(tok, system_msgs, history, budget, memory, write) -> tuple[list[dict], list[dict]]:
    """(the prompt's messages, the history still in the window), telling the user what fell
    out. The history keeps only the window: what fell out lives on in the memory."""
    if memory is None:
        kept, dropped = fit_history(tok, system_msgs + history, budget)
        if dropped:
            write(f"(context full: {FELL_OUT['drop'].format(n=dropped)})\n")
        return kept, kept[len(system_msgs) :]
    fitted = memory.fit(tok, system_msgs + history, budget)
    if fitted.dropped:
        done = FELL_OUT.get(memory.name, FELL_OUT["drop"]).format(n=fitted.dropped)
        write(f"(context full: {done})\n")
    if fitted.retrieved:
        write(f"(brought back earlier messages {', '.join(map(str, fitted.retrieved))})\n")
    return fitted.messages, fitted.kept[len(system_msgs) :]


def _forget(memory) -> None:
    if memory is not None:
        memory.reset()


def save_conversation(messages: list[dict], dest: str | Path) -> None:
    """Write the messages as JSON to dest (`~` expanded). An OSError (dest is a directory, its
    folder is missing, ...) reaches the caller, which reports it and keeps the conversation."""
    text = json.dumps(messages, ensure_ascii=False, indent=2)
    Path(dest).expanduser().write_text(text, encoding="utf-8")


def _echo(pieces: Iterator[str], write) -> Iterator[str]:
    for piece in pieces:
        write(piece)
        yield piece
