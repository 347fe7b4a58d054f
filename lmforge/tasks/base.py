"""The shape of a verifiable-reward task, as RL trains on it and scores it.

The one idea: a problem carries its prompt already encoded (so the trainer never formats text)
and its reference answer as text (so a checker compares strings); a task is a pure function
from a step to that step's problems, a held-out list and a reward in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Problem:
    text: str  # the question as shown in reports ("7+5")
    prompt_ids: list[int]  # what the policy is given
    answer: str  # the reference the checker compares with ("12")


@dataclass
class Task:
    """A verifiable-reward task. `train(step)` is the step's prompts, a pure function of the
    step; `reward(problem, answer_ids)` scores an answer (stop token removed) in [0, 1], where
    1 means correct; `eval` is the held-out set, never trained on."""

    name: str
    train: Callable[[int], list[Problem]]
    eval: list[Problem]
    reward: Callable[[Problem, list[int]], float]
    info: dict = field(default_factory=dict)  # counts for the summary
    target: Callable[[Problem], list[int]] | None = None  # a correct answer's ids (cold start)


# (user turn, plain text) -> prompt ids: the caller decides between the chat template and
# plain text, so tasks need not know how a chat is rendered
Encode = Callable[[str, str], list[int]]
# (user turn, answer text) -> the ids of that answer as the policy would write it, then stop
Reply = Callable[[str, str], list[int]]
