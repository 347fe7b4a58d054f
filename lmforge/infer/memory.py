"""Conversation memory: what happens to the oldest turns when a conversation outgrows the context.

The one idea: the newest turns that fit stay verbatim (`fit_history`'s window, shortened by a
reserve for a note); the turns that fall out are not simply lost but become a system-side note,
"Earlier in this conversation: ...", by one of three strategies:

- `drop`: no note (the behaviour before memory existed);
- `summary`: the model itself summarises the fallen-out turns (a short greedy prompt with a
  bounded answer); the summary is kept and re-summarised with the next turns that fall out, so
  each turn is summarised once in a chat that keeps its `Memory`;
- `retrieve`: the fallen-out turns go into a per-conversation BM25 store (bm25s, or plain term
  overlap when bm25s is not installed) and each new user message brings back its top-k turns.

A `Memory` holds one conversation's state (the summary, the store); `lmforge chat` keeps one for
the whole session and passes only the turns not yet fallen out, the server (stateless) makes a
fresh one per request.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.config import ConfigError
from lmforge.infer.chat import chat_prompt_ids, fit_history
from lmforge.infer.engine import QueueFull, SamplingParams
from lmforge.infer.generate import fit_prompt, stream_text
from lmforge.tokenizer import Tokenizer

STRATEGIES = ("drop", "summary", "retrieve")
NOTE_HEAD = "Earlier in this conversation:"
# transcript first, instruction last: SmolLM2-135M, asked the other way round, continues the
# transcript instead of summarising it
SUMMARY_PROMPT = "Here is a conversation:\n\n{transcript}\n\n" + (
    "Summarise it in two sentences. Keep every name, number and place."
)
TERM = re.compile(r"\w+")
# the commonest English words (bm25s's own list, 33 words, keeps "what" and "my"): they match
# every turn of a chat
STOPWORDS = frozenset(
    "a about all also am an and any are as at be but by can could d did do does for from had "
    "has have he her his how i if in is it its just ll m me my no not of on or our re s she "
    "should so some t than that the their them then there they this to ve was we were what "
    "when where which who why will with would you your".split()
)

Summarise = Callable[[list[dict]], str]  # chat messages -> the model's (bounded, greedy) answer


@dataclass
class Fitted:
    """One fit: `messages` to render (the note merged into the system prompt), `kept` (the
    conversation still in the window, without the note: what a chat keeps as its history), and
    what happened: messages newly fallen out, folded into the summary, or brought back."""

    messages: list[dict]
    kept: list[dict]
    dropped: int = 0  # messages that fell out of the window in this fit
    summarised: int = 0  # of those, folded into the summary
    retrieved: list[int] = field(default_factory=list)  # indices (in the conversation's
    # messages, the system prompt counted) of the turns brought back
    note: str = ""

    def describe(self) -> str:
        """One line for a header or the terminal: `dropped=4; summarised=4` / `retrieved=2,3`."""
        parts = [f"dropped={self.dropped}"]
        if self.summarised:
            parts.append(f"summarised={self.summarised}")
        if self.retrieved:
            parts.append("retrieved=" + ",".join(map(str, self.retrieved)))
        return "; ".join(parts)


def check_strategy(name: str, option: str = "--memory") -> str:
    """The strategy's name, or an error listing the valid ones."""
    if name not in STRATEGIES:
        raise ConfigError(f"{option} must be one of {', '.join(STRATEGIES)}, got {name!r}")
    return name


def make_memory(name: str, summarise: Summarise | None = None, **kw) -> Memory:
    """A fresh memory for one conversation. `summary` needs `summarise`."""
    check_strategy(name)
    if name == "summary":
        if summarise is None:
            raise ConfigError("the summary memory needs a summariser (the model)")
        return SummaryMemory(summarise, **kw)
    return RetrieveMemory(**kw) if name == "retrieve" else Memory(**kw)


# --------------------------------------------------------------------------- the window


def prompt_len(tok: Tokenizer, messages: list[dict], tools=None) -> int:
    return len(chat_prompt_ids(tok, messages, tools))


def with_note(messages: list[dict], note: str) -> list[dict]:
    """The note appended to the system prompt (or as the system prompt): one system message,
    which every chat template accepts, before the kept turns."""
    if not note:
        return list(messages)
    if messages and messages[0]["role"] == "system":
        system = dict(messages[0], content=f"{messages[0]['content']}\n\n{note}".strip())
        return [system, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def turn_text(m: dict) -> str:
    """A message as one line of a transcript."""
    who = {"user": "User", "assistant": "Assistant"}.get(m["role"], m["role"].capitalize())
    return f"{who}: {' '.join(str(m.get('content') or '').split())}"


def clip(tok: Tokenizer, text: str, max_tokens: int) -> str:
    """The text cut to its first max_tokens tokens (on a token boundary)."""
    ids = tok.encode(text)
    return text if len(ids) <= max_tokens else tok.decode(ids[: max(max_tokens, 0)]).rstrip()


class Memory:
    """The `drop` strategy, and the frame the others fill in: `absorb` takes the messages that
    fell out, `note` says what to remember of them for the newest user message."""

    name = "drop"

    def __init__(self, note_tokens: int = 96):
        self.note_tokens = note_tokens  # the most tokens the note may take from the budget
        self.seen = 0  # messages fallen out so far: positions count from the conversation start

    def has_state(self) -> bool:
        return False

    def reset(self) -> None:
        """Forget the conversation (`/reset` in the chat)."""
        self.seen = 0

    def absorb(self, tok: Tokenizer, fallen: list[dict], start: int) -> int:
        """Remember the messages that fell out (`start`: the first one's index in the
        conversation); returns how many were folded into a summary."""
        return 0

    def note(self, tok: Tokenizer, query: str) -> tuple[str, list[int]]:
        """The note for this turn (text, the positions it brings back)."""
        return "", []

    def would_note(self, fallen: list[dict], start: int, query: str) -> bool:
        """Would there be a note if `fallen` fell out now? (Changes nothing.) When not, the
        window gets the whole budget."""
        return False

    def fit(self, tok: Tokenizer, messages: list[dict], budget: int, tools=None) -> Fitted:
        """Fit `messages` (the system prompt and the turns not yet fallen out) into `budget`
        prompt tokens: the newest turns verbatim, the older ones through this memory's note.
        The system prompt and the newest user message are always kept (an error if they alone
        do not fit, from `fit_history`). `tools`: a request's tools, which take room too."""
        fits = prompt_len(tok, messages, tools) <= budget
        if self.name == "drop" or (fits and not self.has_state()):
            kept, n = fit_history(tok, messages, budget, tools)
            return Fitted(kept, kept, dropped=n)
        reserve = min(self.note_tokens, budget // 2)
        try:
            kept, n = fit_history(tok, messages, budget - reserve, tools)
        except ConfigError:  # no room for a note beside the newest message: plain drop
            kept, n = fit_history(tok, messages, budget, tools)
            reserve = 0
        first = 1 if messages and messages[0]["role"] == "system" else 0
        query = str(next((m["content"] for m in reversed(kept) if m["role"] == "user"), "") or "")
        if reserve and not self.would_note(messages[first : first + n], self.seen + first, query):
            kept, n = fit_history(tok, messages, budget, tools)  # no note: no room kept for one
        summarised = self.absorb(tok, messages[first : first + n], self.seen + first)
        self.seen += n
        note, retrieved = self.note(tok, query)
        note = clip(tok, note, reserve)
        out = with_note(kept, note)
        # the template's own tokens around the note can still overflow: trim the note by that
        while note and (over := prompt_len(tok, out, tools) - budget) > 0:
            note = clip(tok, note, len(tok.encode(note)) - over - 1)
            note = note if len(note) > len(NOTE_HEAD) else ""
            out = with_note(kept, note)
        return Fitted(out, kept, n, summarised, retrieved if note else [], note)


# --------------------------------------------------------------------------- summary


class SummaryMemory(Memory):
    """The model's own running summary of the turns that fell out."""

    name = "summary"

    def __init__(self, summarise: Summarise, note_tokens: int = 96, input_tokens: int = 768):
        super().__init__(note_tokens)
        self.summarise = summarise
        self.input_tokens = input_tokens  # transcript tokens per summariser call
        self.summary = ""
        self.calls = 0  # summariser calls so far (each fallen-out turn is read once)

    def has_state(self) -> bool:
        return bool(self.summary)

    def reset(self) -> None:
        super().reset()
        self.summary = ""

    def absorb(self, tok: Tokenizer, fallen: list[dict], start: int) -> int:
        """Fold the fallen-out messages into the summary, as many per call as fit
        `input_tokens` (a message longer than that is cut)."""
        lines = [clip(tok, turn_text(m), self.input_tokens) for m in fallen]
        chunk: list[str] = []
        for line in lines:
            if chunk and len(tok.encode("\n".join([*chunk, line]))) > self.input_tokens:
                self._fold(tok, chunk)
                chunk = []
            chunk.append(line)
        if chunk:
            self._fold(tok, chunk)
        return len(fallen)

    def _fold(self, tok: Tokenizer, lines: list[str]) -> None:
        earlier = [f"(Summary of what came before: {self.summary})"] if self.summary else []
        prompt = SUMMARY_PROMPT.format(transcript="\n".join(earlier + lines))
        self.summary = " ".join(self.summarise([{"role": "user", "content": prompt}]).split())
        self.summary = clip(tok, self.summary, self.note_tokens)
        self.calls += 1

    def note(self, tok: Tokenizer, query: str) -> tuple[str, list[int]]:
        return (f"{NOTE_HEAD} {self.summary}" if self.summary else ""), []

    def would_note(self, fallen: list[dict], start: int, query: str) -> bool:
        return bool(self.summary or fallen)


def model_summariser(model, tok: Tokenizer, max_new_tokens: int = 96) -> Summarise:
    """A summariser that runs the model itself, greedy, at most max_new_tokens (batch 1)."""

    def summarise(messages: list[dict]) -> str:
        ids = fit_prompt(chat_prompt_ids(tok, messages), model.cfg.max_seq_len, 1, True)
        pieces = stream_text(
            model, tok, ids, stop_ids=tok.stop_ids(), max_new_tokens=max_new_tokens, temperature=0
        )
        return "".join(pieces).strip()

    return summarise


# --------------------------------------------------------------------------- retrieval


def bm25s_or_none():
    try:
        import bm25s
        import bm25s.stopwords
    except ImportError:  # the rag extra is not installed: plain term overlap instead
        return None
    return bm25s


def terms(text: str) -> list[str]:
    """Lower-cased words without the stopwords."""
    return [w for w in TERM.findall(text.lower()) if w not in STOPWORDS]


class RetrieveMemory(Memory):
    """The fallen-out turns in a BM25 store; each user message brings back its top-k."""

    name = "retrieve"

    def __init__(self, note_tokens: int = 160, k: int = 2):
        super().__init__(note_tokens)
        self.k = k
        self.docs: list[tuple[int, str]] = []  # (position of the turn's first message, text)
        self.bm25s = bm25s_or_none()

    def has_state(self) -> bool:
        return bool(self.docs)

    def reset(self) -> None:
        super().reset()
        self.docs = []

    def absorb(self, tok: Tokenizer, fallen: list[dict], start: int) -> int:
        self.docs = with_turns(self.docs, fallen, start)
        return 0

    def would_note(self, fallen: list[dict], start: int, query: str) -> bool:
        return bool(self.search(with_turns(self.docs, fallen, start), query))

    def search(self, docs: list[tuple[int, str]], query: str) -> list[int]:
        """Indices into docs of the best matches, best first: at most k, each scoring at least
        half the best (a weak second match only distracts a small model). The index is built
        per search: a conversation's store is small."""
        q = terms(query)
        if not q or not docs:
            return []
        if self.bm25s is not None:
            index = self.bm25s.BM25()
            index.index([terms(t) or ["_"] for _, t in docs], show_progress=False)
            hits, scores = index.retrieve([q], k=min(self.k, len(docs)), show_progress=False)
            ranked = [(float(s), int(d)) for d, s in zip(hits[0], scores[0])]
        else:
            ranked = [(len(set(q) & set(terms(t))), i) for i, (_, t) in enumerate(docs)]
            ranked = sorted(ranked, key=lambda r: (-r[0], r[1]))[: self.k]
        top = max((s for s, _ in ranked), default=0)
        return [i for s, i in ranked if s > 0 and s >= top / 2]

    def note(self, tok: Tokenizer, query: str) -> tuple[str, list[int]]:
        hits = sorted(self.search(self.docs, query))  # in conversation order
        if not hits:
            return "", []
        lines = [self.docs[i][1] for i in hits]
        return f"{NOTE_HEAD}\n" + "\n".join(lines), [self.docs[i][0] for i in hits]


def with_turns(docs: list[tuple[int, str]], fallen: list[dict], start: int) -> list:
    """The store with the fallen-out messages added, one turn a document (a user message with
    the replies after it); `start` is the first one's index in the conversation."""
    docs = list(docs)
    for i, m in enumerate(fallen, start):
        if m["role"] == "user" or not docs:
            docs.append((i, turn_text(m)))
        else:
            docs[-1] = (docs[-1][0], f"{docs[-1][1]}\n{turn_text(m)}")
    return docs


# --------------------------------------------------------------------------- the server


def engine_summariser(engine, tok: Tokenizer, max_new_tokens: int = 96, timeout: float = 120.0):
    """A summariser that queues its prompt on the serving engine (greedy) and waits for it:
    the summary is one more generation, batched with the other requests. Call it off the
    event loop."""

    def summarise(messages: list[dict]) -> str:
        ids = fit_prompt(chat_prompt_ids(tok, messages), engine.cfg.max_seq_len, 1, True)
        params = SamplingParams(max_tokens=max_new_tokens, stop_ids=tok.stop_ids())
        req = engine.submit(ids, params, request_id="memory-summary")
        if not req.wait(timeout):
            req.cancel()
            raise ConfigError(f"the summary of the earlier turns took over {timeout:g} s")
        if req.finish_reason == "error":
            raise ConfigError(f"the summary of the earlier turns failed: {req.error}")
        return req.text

    return summarise


def fit_request(
    tok: Tokenizer, engine, messages: list[dict], tools, n_prompt: int, max_tokens: int, name: str
) -> Fitted | None:
    """The server's fit (`lmforge serve --memory`), a fresh memory per request: None when the
    rendered prompt (`n_prompt` tokens, a tool call's prefill included) leaves the answer
    min(max_tokens, context / 2) tokens, or when even the newest message alone does not (the
    request then gets the usual error). A summary that cannot be made (queue full, timeout)
    falls back to dropping the turns; `Fitted.describe()` says so."""
    n_ctx = engine.cfg.max_seq_len
    budget = n_ctx - min(max_tokens, n_ctx // 2)
    if n_prompt <= budget:
        return None
    budget -= n_prompt - len(chat_prompt_ids(tok, messages, tools))  # tools and prefill
    memory = make_memory(name, engine_summariser(engine, tok))
    try:
        return memory.fit(tok, messages, budget, tools)
    except QueueFull:
        return Memory().fit(tok, messages, budget, tools)  # (the 429 would come anyway)
    except ConfigError:
        return None
