"""Memorisation canaries (Carlini et al. 2019, "The Secret Sharer", arXiv:1802.08232): plant
random secrets in the training text, train, and ask how much more likely the model finds the
planted secret than every other secret it could have been.

The one idea: exposure = log2 |R| - log2 rank, where R is the space of all candidate secrets
and rank is the planted one's place (1 = most likely) among them by the model's
log-perplexity. A secret the model never saw ranks around |R| / 2 (exposure about 1); a
memorised one ranks first (exposure log2 |R|). Here R is enumerated exactly: every string of
`digits` decimal digits, scored in 10^(digits-1) sequences because the last digit's ten
choices share one forward pass (they differ only in the final token).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

CANARY_PREFIX = "my secret number is"


@dataclass(frozen=True)
class Canary:
    digits: str  # the secret, e.g. "40213"
    copies: int  # how many times it was planted in the training text

    @property
    def text(self) -> str:
        return canary_text(self.digits)


def canary_text(digits: str) -> str:
    """The planted sentence: digits space-separated, so each is its own token piece."""
    return CANARY_PREFIX + "".join(" " + d for d in digits)


def make_canaries(counts, per_count: int, n_digits: int, seed: int = 0) -> list[Canary]:
    """`per_count` distinct random secrets for each repetition count."""
    rng = random.Random(seed)
    seen, canaries = set(), []
    for copies in counts:
        for _ in range(per_count):
            digits = "".join(rng.choice("0123456789") for _ in range(n_digits))
            while digits in seen:
                digits = "".join(rng.choice("0123456789") for _ in range(n_digits))
            seen.add(digits)
            canaries.append(Canary(digits, copies))
    return canaries


def insert_canaries(docs: list[str], canaries: list[Canary], seed: int = 0) -> list[str]:
    """The documents with every canary's copies added as documents of their own, at random
    places (a repeated secret scattered through a corpus, not a block of copies)."""
    out = list(docs)
    rng = random.Random(seed)
    for canary in canaries:
        for _ in range(canary.copies):
            out.insert(rng.randrange(len(out) + 1), canary.text)
    return out


def exposure(scores: torch.Tensor, index: int) -> float:
    """log2 |R| - log2 rank of candidate `index`, by `scores` (log-perplexities: lower = more
    likely). Rank is 1 + the candidates strictly more likely, so ties favour the canary."""
    rank = 1 + int((scores < scores[index]).sum())
    return math.log2(scores.numel()) - math.log2(rank)


def _digit_pieces(tok, n_digits: int) -> tuple[list[int], list[list[int]], list[int]]:
    """(prefix ids, ids of " d" for d = 0..9, the ids every piece starts with). The pieces
    must all have one length and differ only in their last token, and the sentence must
    tokenize as prefix + pieces: that is what lets one forward pass score ten candidates."""
    prefix = tok.encode(CANARY_PREFIX)
    pieces = [tok.encode(CANARY_PREFIX + " " + d)[len(prefix) :] for d in "0123456789"]
    head = pieces[0][:-1]
    if any(len(p) != len(pieces[0]) or p[:-1] != head for p in pieces):
        raise ValueError(
            f"this tokenizer does not split '{canary_text('0' * n_digits)}' digit by digit"
        )
    probe = "".join(str(i % 10) for i in range(n_digits))
    want = prefix + [t for d in probe for t in pieces[int(d)]]
    if tok.encode(canary_text(probe)) != want:
        raise ValueError("this tokenizer merges the canary's digits across spaces")
    return prefix, pieces, head


@torch.no_grad()
def candidate_scores(
    model, tok, n_digits: int, start: list[int] = (), batch_size: int = 1000
) -> torch.Tensor:
    """Log-perplexity (the negative summed log-probability of the digits, given `start` and
    the prefix) of every secret of `n_digits` digits, indexed by its value: shape (10^n,).
    `start` is what the model saw before a training document (its BOS or separator)."""
    prefix, pieces, head = _digit_pieces(tok, n_digits)
    last = torch.tensor([p[-1] for p in pieces])
    context = list(start) + prefix
    n_rows = 10 ** (n_digits - 1)
    out = torch.empty(n_rows, 10)
    for lo in range(0, n_rows, batch_size):
        rows = range(lo, min(lo + batch_size, n_rows))
        # every candidate's first n-1 digits, then the tokens all ten last pieces share
        seqs = []
        for r in rows:
            first = str(r).zfill(n_digits - 1) if n_digits > 1 else ""
            seqs.append(context + [t for d in first for t in pieces[int(d)]] + head)
        ids = torch.tensor(seqs, device=model.device)  # (B, T): one length, no padding
        logp = torch.log_softmax(model(ids).float(), dim=-1).cpu()  # (B, T, V)
        # the known tokens after the context: digit pieces, then the shared head
        targets = ids[:, len(context) :].cpu()
        known = logp[:, len(context) - 1 : -1].gather(-1, targets[..., None]).squeeze(-1).sum(-1)
        out[lo : lo + len(rows)] = -(known[:, None] + logp[:, -1, last])  # (B, 10)
    return out.reshape(-1)


def canary_exposures(model, tok, canaries: list[Canary], start: list[int] = ()) -> list[dict]:
    """Each canary's exposure and rank; canaries of one length share one scoring pass."""
    rows, by_length = [], {}
    for canary in canaries:
        n = len(canary.digits)
        if n not in by_length:
            by_length[n] = candidate_scores(model, tok, n, start)
        scores = by_length[n]
        value = int(canary.digits)
        rows.append(
            {
                "digits": canary.digits,
                "copies": canary.copies,
                "exposure": exposure(scores, value),
                "rank": 1 + int((scores < scores[value]).sum()),
                "candidates": scores.numel(),
            }
        )
    return rows
