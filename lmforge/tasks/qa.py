"""The reference-answer checker behind PPO's `qa` reward: an answer is correct, an abstention
("I don't know"), or wrong, and each outcome has its reward.

The one idea: abstaining is its own outcome, checked before correctness, so a hedge that names
the answer among guesses earns nothing, while a plain "I don't know" can be rewarded above a
wrong answer: a model learns to abstain rather than make something up. A question whose context
does not hold the answer (SQuAD v2's unanswerable ones) has the reference UNANSWERABLE: there an
abstention is the correct answer and anything else is wrong.
"""

from __future__ import annotations

import re
import unicodedata

from lmforge.config import PPOConfig

# Phrases that mark an answer as an abstention, matched after `normalize` (case, punctuation
# and spacing do not matter; English phrases must stand as whole words).
ABSTAIN_PHRASES = (
    "i don't know",
    "i do not know",
    "not sure",
    "not certain",
    "i cannot answer",
    "i can't answer",
    "unable to answer",
    "i have no idea",
    "i don't have enough information",
    "no way to know",
    # how a small chat model says that the passage it was given does not answer
    "does not contain the answer",
    "do not contain the answer",
    "doesn't contain the answer",
    "does not provide any information",
    "does not provide the answer",
    "not mentioned in the passage",
    "not specified",
    "not stated",
    "no information",
    "我不知道",
    "不知道",
    "不确定",
    "不清楚",
    "无法回答",
    "不能回答",
    "没有把握",
)
# The reference of a question that has no answer (in a row: "answer": "<unanswerable>")
UNANSWERABLE = "<unanswerable>"
# A number as written in an answer: 42, -3, 1,000, 2.50 (not the 2 of "x2" or "v1.2")
NUMBER = re.compile(r"(?<![0-9A-Za-z.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lower case, full-width forms folded (NFKC), punctuation and symbols made spaces, runs of
    whitespace collapsed: "  Paris!" and "paris" compare equal."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def _contains(text: str, phrase: str) -> bool:
    """Is normalised phrase in normalised text? Latin letters and digits must not touch it on
    either side ("paris" is not in "parisian"); CJK has no spaces, so a substring is enough."""
    if not phrase:
        return False
    return re.search(rf"(?<![0-9a-z]){re.escape(phrase)}(?![0-9a-z])", text) is not None


def _numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in NUMBER.findall(unicodedata.normalize("NFKC", text))]


def qa_check(answer: str, reference: str) -> str:
    """Grade an answer against the reference: "abstain" if it says it does not know (checked
    first: a hedge earns no credit for naming the answer among guesses), "correct" if it
    contains the reference (a numeric reference matches any number in the answer of the same
    value: 1,000 = 1000.0), else "wrong". With the reference UNANSWERABLE an abstention is
    "correct" and any other answer "wrong"."""
    text = normalize(answer)
    abstains = any(_contains(text, normalize(p)) for p in ABSTAIN_PHRASES)
    if reference.strip() == UNANSWERABLE:
        return "correct" if abstains else "wrong"
    if abstains:
        return "abstain"
    ref = reference.strip().rstrip(".")
    if NUMBER.fullmatch(unicodedata.normalize("NFKC", ref)):
        value = float(unicodedata.normalize("NFKC", ref).replace(",", ""))
        hit = any(abs(v - value) <= 1e-9 * max(1.0, abs(value)) for v in _numbers(answer))
    else:
        hit = _contains(text, normalize(ref))
    return "correct" if hit else "wrong"


def qa_reward(outcome: str, cfg: PPOConfig) -> float:
    """The reward the ppo section gives an outcome of `qa_check`."""
    return {
        "correct": cfg.correct_reward,
        "abstain": cfg.abstain_reward,
        "wrong": cfg.wrong_reward,
    }[outcome]


def qa_reference(value) -> str:
    """A row's `answer` field as the reference text: a string or a number; GSM8K's
    "...#### 42" keeps what follows the last ####; UNANSWERABLE stays as it is. Raises ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("field 'answer' must be a string or a number")
    answer = str(value).rsplit("####", 1)[-1].strip()
    if not normalize(answer):
        raise ValueError("field 'answer' is empty")
    return answer
