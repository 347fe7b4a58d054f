"""`lmforge rag ask`: retrieved chunks numbered in the prompt, the answer cites them as [n].

Citations are parsed back out of the answer: `[n]` maps to the n-th chunk of the prompt, so a
reader can follow it to the document id and character offsets. With no chunk above the
thresholds the model is not asked at all; when its answer says the sources do not hold the
answer, the reply is the fixed NO_ANSWER sentence (the model's own words kept beside it)."""

from __future__ import annotations

import re

from lmforge.infer.untrusted import NOTE, Defence
from lmforge.rag.search import Hit

NO_ANSWER = "The documents do not contain the answer."
SYSTEM = (
    "Answer the question using only the numbered sources. Give a short answer and cite the "
    "sources you used, like [1] or [2]. If the sources do not contain the answer, reply "
    f"exactly: {NO_ANSWER}"
)
CITE = re.compile(r"\[(\d+)\]")
# how small instruction models phrase "not in the sources"
ABSTAIN = re.compile(
    r"do(es)? not (contain|mention|provide|say|include)|not (contain|mention)ed|no information|"
    r"(cannot|can't|unable to) (be )?(answer|determine|find)|not (specified|stated|provided)|"
    r"(do not|don't) know",
    re.IGNORECASE,
)


def build_messages(question: str, hits: list[Hit], defence: Defence = Defence()) -> list[dict]:
    """A chat: the instructions as the system message, the numbered sources and the question.
    The sources are untrusted text: with spotlighting each is wrapped in data markers, and the
    system message says what they mean."""
    sources = "\n\n".join(
        f"[{n}] {h.title}: {defence.wrap(h.text)}" if h.title else f"[{n}] {defence.wrap(h.text)}"
        for n, h in enumerate(hits, 1)
    )
    return [
        {"role": "system", "content": f"{SYSTEM} {NOTE}" if defence.spotlight else SYSTEM},
        {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {question}"},
    ]


def hold_back(hits: list[Hit], defence: Defence) -> tuple[list[Hit], list[dict]]:
    """(the hits to use, [{doc_id, start, end, rules}] of those the injection rules held back)."""
    kept, held = [], []
    for h in hits:
        if rules := defence.flagged(h.text):
            held.append({"doc_id": h.doc_id, "start": h.start, "end": h.end, "rules": rules})
        else:
            kept.append(h)
    return kept, held


def ground(messages: list[dict], hits: list[Hit], defence: Defence = Defence()) -> list[dict]:
    """A conversation grounded in `hits`: the last user message becomes the numbered sources and
    its question (`build_messages`' form), the rag instructions lead the system message (the
    conversation's own system prompt follows them), earlier turns stay as they were."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    system, grounded = build_messages(messages[last]["content"], hits, defence)
    own = [m["content"] for m in messages if m["role"] in ("system", "developer") and m["content"]]
    system = {**system, "content": "\n\n".join([system["content"], *own])}
    rest = [m for m in messages[:last] if m["role"] not in ("system", "developer")]
    return [system, *rest, grounded, *messages[last + 1 :]]


def citations(answer: str, hits: list[Hit]) -> tuple[list[dict], list[int]]:
    """([{n, doc_id, title, start, end, scores}] for each source cited, in order of first
    citation], [numbers cited that match no source])."""
    cited, bad = [], []
    for n in dict.fromkeys(int(m) for m in CITE.findall(answer)):
        if 1 <= n <= len(hits):
            h = hits[n - 1]
            cited.append({"n": n, **{k: v for k, v in h.as_dict().items() if k != "rank"}})
        else:
            bad.append(n)
    return cited, bad


def abstains(answer: str) -> bool:
    return NO_ANSWER.lower().rstrip(".") in answer.lower() or bool(ABSTAIN.search(answer))


def fit_hits(
    tok, question: str, hits: list[Hit], max_prompt_tokens: int, defence: Defence = Defence()
) -> list[Hit]:
    """The best-ranked hits whose prompt fits the context (the lowest-ranked dropped first)."""
    from lmforge.infer.chat import chat_prompt_ids

    def size(hits):
        return len(chat_prompt_ids(tok, build_messages(question, hits, defence)))

    hits = list(hits)
    while hits and size(hits) > max_prompt_tokens:
        hits.pop()
    return hits


def ask(
    model, tok, question: str, hits: list[Hit], max_new_tokens: int = 96,
    defence: Defence = Defence(),
) -> dict:  # fmt: skip
    """The answer to `question` from the retrieved `hits`: {answer, model_answer (None when
    nothing was retrieved), abstained, citations, unknown_citations, sources, held_back};
    greedy decoding, so the same index and model always answer alike. `defence`: retrieved text
    is untrusted (hold_back, spotlighting)."""
    from lmforge.infer.chat import answer

    hits, held = hold_back(hits, defence)
    if hits:
        hits = fit_hits(tok, question, hits, model.cfg.max_seq_len - max_new_tokens, defence)
    if not hits:
        return {"answer": NO_ANSWER, "model_answer": None, "abstained": True, "citations": [],
                "unknown_citations": [], "sources": [], "held_back": held}  # fmt: skip
    messages = build_messages(question, hits, defence)
    text = "".join(answer(model, tok, messages, max_new_tokens=max_new_tokens,
                          temperature=0.0)).strip()  # fmt: skip
    cited, bad = citations(text, hits)
    abstained = abstains(text)
    return {
        "answer": NO_ANSWER if abstained else text,
        "model_answer": text,
        "abstained": abstained,
        "citations": [] if abstained else cited,
        "unknown_citations": bad,
        "sources": [h.as_dict() for h in hits],
        "held_back": held,
    }
