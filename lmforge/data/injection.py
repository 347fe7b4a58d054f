"""Prompt-injection rules: does a text that enters the prompt from outside the user (a retrieved
chunk, a tool result, a document) try to give the model orders?

The one idea: injected text addresses the model, not the reader: "ignore the previous
instructions", "from now on you are", "reply only with". A handful of patterns in English,
Chinese and German (the bundled injection sets have all three) catch the common forms; each
hit names its rule, so a user sees why a passage was held back. Rules are a first line: a
paraphrase they do not list gets through (docs/injection.md measures how often).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PREV = r"(?:previous|prior|above|earlier|preceding|foregoing|initial|original|system)"
_ORDERS = r"(?:instructions?|prompts?|rules|directions|guidelines|commands|context|messages)"
RULES: dict[str, re.Pattern] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        "ignore-previous": rf"\b(?:ignore|disregard|forget|skip|override|bypass)\b[^.\n]{{0,30}}?"
        rf"\b{_PREV}\b[^.\n]{{0,20}}?\b{_ORDERS}\b",
        "ignore-your-rules": rf"\b(?:ignore|disregard|forget)\b (?:all |any )?(?:of )?(?:your|the|these|those) {_ORDERS}\b",
        "new-instructions": r"\bnew (?:instructions?|task|rules)\s*:",
        "role-change": r"\b(?:from now on,? you|you are now|you are no longer|pretend (?:to be|you are)|"
        r"now act as|you will now act)\b",
        "reply-only": r"\b(?:reply|respond|answer|say|output|print|write)\b (?:only |just )?"
        r"(?:with |exactly )?(?:only |just )?[\"'“‘]",
        "instead-reply": r"\binstead,? (?:reply|respond|answer|say|output|print|write)\b",
        "reveal-prompt": r"\b(?:reveal|show|print|repeat|leak)\b[^.\n]{0,20}\b(?:system prompt|"
        r"your (?:instructions|prompt|rules))\b",
        "addresses-the-reply": r"\b(?:in|into|to|with|throughout|within) your (?:response|reply|answer|output)s?\b|"
        r"\b(?:render|provide|give|write|format|end|start|begin) your (?:response|reply|answer)\b|"
        r"\b(?:reply|respond|answer) (?:in|using) (?:reverse|emojis?|base64|[A-Z][a-z]+ish|Portuguese|"
        r"French|German|Spanish|Chinese|Italian|Russian)\b",
        "new-task": r"\b(?:now (?:focus on|comes?) (?:your|a) new task|new tasks? follows?|"
        r"start over with a new task|that is enough\. now)\b|\bi want you to act as\b",
        "jailbreak": r"\b(?:developer mode|jailbr[eo]ak|do anything now|DAN mode)\b",
        "zh-ignore": r"(?:忽略|无视|忘记|忘掉|不要理会|不要遵守)[^。\n]{0,10}?"
        r"(?:之前|以上|上面|前面|先前|原来|所有|全部)[^。\n]{0,6}?(?:指令|指示|说明|提示|规则|要求|命令)",
        "zh-role-change": r"(?:从现在开始|现在起|从现在起)[^。\n]{0,6}?你|你现在是|你不再是|扮演",
        "zh-reply-only": r"(?:只|仅)(?:需)?(?:回复|回答|输出|说)[^。\n]{0,4}?[\"'“‘「]",
        "de-ignore": r"\b(?:ignoriere|vergiss|missachte)\b[^.\n]{0,30}?\b(?:vorherigen|bisherigen|"
        r"obigen|alle|alles)\b[^.\n]{0,20}?\b(?:Anweisungen|Instruktionen|Befehle|Regeln|Aufgaben)?",
        "de-role-change": r"\b(?:ab jetzt|von nun an) (?:bist du|du bist)\b|\bdu bist (?:jetzt|nun)\b",
    }.items()
}


@dataclass(frozen=True)
class Hit:
    rule: str
    start: int
    end: int


def find_injection(text: str) -> list[Hit]:
    """Every rule match in `text`, in order of position."""
    hits = [Hit(name, m.start(), m.end()) for name, rx in RULES.items() for m in rx.finditer(text)]
    return sorted(hits, key=lambda h: (h.start, h.rule))


def is_injection(text: str) -> bool:
    return any(rx.search(text) for rx in RULES.values())
