"""Log-likelihood scoring: the one primitive behind multiple-choice benchmarks and perplexity.

A request is (context ids, continuation ids); the model reads context + continuation once and we
sum the log-probabilities of the continuation tokens only. Batches are right-padded: with causal
attention, padding after a row's last real token cannot change that row's logits, so padded and
one-at-a-time scoring agree.
"""

from __future__ import annotations

import math

import torch

from lmforge.config import ConfigError


@torch.no_grad()
def loglikelihood(
    model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """(summed log-prob of the continuation, whether every continuation token is the greedy
    argmax) per request, in input order. Contexts too long for the model lose their oldest tokens;
    the continuation is always kept whole."""
    max_len = model.cfg.max_seq_len
    rows = []  # (input ids, target ids, continuation length)
    for ctx, cont in requests:
        assert len(ctx) > 0, (
            "empty context: start it with BOS, the model needs a token to predict from"
        )
        assert 0 < len(cont) <= max_len, (
            f"continuation of {len(cont)} tokens does not fit the model's context of {max_len}"
        )
        full = (list(ctx) + list(cont))[-(max_len + 1) :]  # left truncation
        rows.append((full[:-1], full[1:], len(cont)))
    # longest first: each batch pads to its first row, so similar lengths waste the least compute
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    device = next(model.parameters()).device
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = len(rows[idx[0]][0])
        x = torch.zeros(len(idx), T, dtype=torch.long)  # pad id 0: never read by a real token
        y = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.bool)  # the continuation's target positions
        for r, i in enumerate(idx):
            inp, tgt, n_cont = rows[i]
            x[r, : len(inp)] = torch.tensor(inp)
            y[r, : len(tgt)] = torch.tensor(tgt)
            mask[r, len(tgt) - n_cont : len(tgt)] = True
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        logp = model(x).float().log_softmax(-1)  # (B, T, V)
        tok_logp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, T)
        hit = logp.argmax(-1) == y  # (B, T)
        sums = (tok_logp * mask).sum(-1).tolist()
        greedy = (hit | ~mask).all(-1).tolist()
        for r, i in enumerate(idx):
            out[i] = (sums[r], greedy[r])
    return out


@torch.no_grad()
def perplexity(
    model, tok, text: str | list[int], stride: int | None = None, batch_size: int = 8
) -> dict:
    """Sliding-window perplexity as in HF's guide (huggingface.co/docs/transformers/perplexity):
    windows of the model's context start every `stride` tokens and each scores only the tokens no
    earlier window scored, so every token counts once with up to context-1 tokens of history
    (at least context-stride once past the first window). stride = context is plain chunking:
    then each chunk's first token has no history and goes unscored, as in the guide.
    A string is encoded with BOS first (if the tokenizer has one); token ids are used as given.
    Returns loss (nats/token), perplexity, bits_per_byte (of the scored tokens' text) and tokens."""
    if isinstance(text, str):
        ids = ([tok.bos_id] if tok.prepend_bos else []) + tok.encode(text)
    else:
        ids = [int(t) for t in text]
    L = model.cfg.max_seq_len
    stride = stride or L
    assert 0 < stride <= L, f"stride {stride} must be in [1, context {L}]"
    requests, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + L, len(ids))
        first = max(prev_end, begin + 1)  # a window's first token has nothing to be predicted from
        if end > first:
            requests.append((ids[begin:first], ids[first:end]))
        prev_end = end
        if end == len(ids):
            break
    if not requests:
        raise ConfigError("nothing to score: the text needs at least two tokens")
    scores = loglikelihood(model, requests, batch_size)
    nats = -sum(s for s, _ in scores)
    scored = [t for _, cont in requests for t in cont]
    n_bytes = int(tok.token_bytes()[scored].sum())
    loss = nats / len(scored)
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
        "tokens": len(scored),
    }
