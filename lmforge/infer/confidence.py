"""How sure is the model of an answer? Two signals per answer, and AUROC to check them.

- **logprob**: the mean log-probability the model gave the answer's own tokens (the model's
  distribution, before temperature and penalties, as OpenAI's `logprobs` report it). Its
  exponential, the geometric mean token probability, is the confidence in [0, 1].
- **self_consistency**: sample the answer k more times; the confidence is the share of samples
  that say the same thing as the answer (Wang et al. 2022, arXiv:2203.11171, used as a
  confidence as in Manakul et al. 2023's SelfCheckGPT). It costs k generations but needs no
  logits, and it sees that the *content* is unstable where logprob only sees the wording.

The one idea: a confidence signal is worth what its calibration says, so `auroc` (how often a
correct answer outranks a wrong one) is measured for both in benchmarks/calibration.py.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from lmforge.config import ConfigError

METHODS = ("logprob", "self_consistency")


# --------------------------------------------------------------------------- logprob


@torch.inference_mode()
def answer_logprobs(model, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> list[float]:
    """Log-probability of each answer token given the prompt and the answer before it: one
    teacher-forced forward over prompt + answer, so it works for any answer, generated or not."""
    if not prompt_ids or not answer_ids:
        raise ConfigError("answer_logprobs needs a non-empty prompt and answer")
    ids = list(prompt_ids) + list(answer_ids)
    if len(ids) > model.cfg.max_seq_len:
        raise ConfigError(
            f"prompt + answer are {len(ids)} tokens but the model's context is "
            f"{model.cfg.max_seq_len}"
        )
    device = getattr(model, "device", None) or next(model.parameters()).device
    x = torch.tensor([ids[:-1]], dtype=torch.long, device=device)
    logits = model(x)[0, len(prompt_ids) - 1 :].float()  # (n_answer, V): predicts each answer id
    target = torch.tensor(list(answer_ids), dtype=torch.long, device=device)
    return logits.log_softmax(-1).gather(-1, target[:, None])[:, 0].tolist()


def logprob_confidence(logprobs: Sequence[float]) -> dict:
    """{method, score, mean_logprob, tokens}: score = exp(mean logprob). An empty answer has
    no tokens to judge: score None (the caller decides what an empty answer means)."""
    if not logprobs:
        return {"method": "logprob", "score": None, "mean_logprob": None, "tokens": 0}
    mean = sum(logprobs) / len(logprobs)
    return {"method": "logprob", "score": math.exp(mean), "mean_logprob": mean,
            "tokens": len(logprobs)}  # fmt: skip


# --------------------------------------------------------------------------- self-consistency


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (lower case, no punctuation, no articles, single spaces), as the
    official evaluation script and benchmarks/rag_eval.py compare answers."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def same_answer(a: str, b: str, min_f1: float = 0.5) -> bool:
    """Do two answers say the same thing? After normalisation: the shorter stands as whole
    words inside the longer ("Paris" and "It is Paris."), or their SQuAD token F1 reaches
    `min_f1` (small models wrap one fact in different sentences). Two empty answers agree; an
    empty one agrees with nothing else."""
    a, b = normalize_answer(a), normalize_answer(b)
    if not a or not b:
        return a == b
    short, long = sorted((a, b), key=len)
    return f" {short} " in f" {long} " or token_f1(a, b) >= min_f1


def token_f1(a: str, b: str) -> float:
    """SQuAD's token F1 of two normalised answers (bags of words)."""
    x, y = a.split(), b.split()
    common = sum((Counter(x) & Counter(y)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(x), common / len(y)
    return 2 * precision * recall / (precision + recall)


def agreement(answer: str, samples: Sequence[str]) -> float:
    """The share of `samples` that say the same as `answer`."""
    if not samples:
        raise ConfigError("agreement needs at least one sample")
    return sum(same_answer(answer, s) for s in samples) / len(samples)


def self_consistency(answer: str, sample: Callable[[int], str], k: int) -> dict:
    """{method, score, samples, agreeing}: `sample(i)` returns the i-th sampled answer (i is its
    seed offset, so a run is reproducible); score is the share of the k that agree with
    `answer` (the one returned to the user, usually the greedy one)."""
    if k < 1:
        raise ConfigError(f"self-consistency needs k >= 1 samples, got {k}")
    samples = [sample(i) for i in range(k)]
    agreeing = sum(same_answer(answer, s) for s in samples)
    return {"method": "self_consistency", "score": agreeing / k, "samples": k,
            "agreeing": agreeing}  # fmt: skip


# --------------------------------------------------------------------------- calibration


def auroc(scores: Sequence[float], correct: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` as a detector of `correct`: the probability that a
    random correct answer scores above a random wrong one, ties counting one half (the
    Mann-Whitney U statistic over n_correct * n_wrong; tied scores share their mean rank).
    0.5 is chance; undefined (ConfigError) unless both classes are present."""
    if len(scores) != len(correct):
        raise ConfigError(f"auroc: {len(scores)} scores but {len(correct)} labels")
    n_pos = sum(bool(c) for c in correct)
    n_neg = len(correct) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ConfigError("auroc needs at least one correct and one wrong answer")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # a run of tied scores gets the mean of its 1-based ranks
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, c in zip(ranks, correct) if c)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# --------------------------------------------------------------------------- one answer


def answer_with_confidence(
    model,
    tok,
    prompt_ids: Sequence[int],
    method: str = "logprob",
    k: int = 5,
    max_new_tokens: int = 64,
    sample_temperature: float = 0.7,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
) -> tuple[str, dict]:
    """(the greedy answer, its confidence by `method`). Self-consistency samples k more
    answers at `sample_temperature` with seeds seed, seed + 1, ... Generation ends at a stop
    id (default: EOS); special tokens other than those are never sampled, as in stream_text."""
    from lmforge.infer.generate import generate, special_ids

    if method not in METHODS:
        raise ConfigError(f"confidence method {method!r} is unknown; use one of {METHODS}")
    stops = tuple(stop_ids) if stop_ids is not None else (tok.eos_id,)
    banned = special_ids(tok, model.cfg.vocab_size)

    def run(temperature: float, seed_: int | None = None) -> list[int]:
        out = list(generate(model, prompt_ids, max_new_tokens, temperature, seed=seed_,
                            stop_ids=stops, banned=banned))  # fmt: skip
        return out[:-1] if out and out[-1] in stops else out

    ids = run(0.0)
    text = tok.decode(ids)
    if method == "logprob":
        return text, logprob_confidence(answer_logprobs(model, prompt_ids, ids) if ids else [])
    return text, self_consistency(text, lambda i: tok.decode(run(sample_temperature, seed + i)), k)
