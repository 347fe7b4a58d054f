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

HEAD_CHUNK = 1024  # positions per output-head call: 1024 x a 49k vocabulary x 4 B = 200 MB


def _states_and_head(model, x: torch.Tensor):
    """(states (B, T, .), head: states (N, .) -> log-probs (N, V)). For a model with `features`
    (the GPT) the states are the final hidden states and the output head runs later, on the
    positions that are scored only: full (B, T, V) logits of 16 five-shot MMLU prompts over a
    49k vocabulary are ~6 GB, and 8 windows of 8,192 tokens ~13 GB. Other models: logits."""
    if hasattr(model, "features"):
        return model.features(x), lambda h: model.lm_head(h).float().log_softmax(-1)
    return model(x), lambda logits: logits.float().log_softmax(-1)


@torch.no_grad()
def loglikelihood(
    model,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 16,
    share_context: bool = True,
) -> list[tuple[float, bool]]:
    """(summed log-prob of the continuation, whether every continuation token is the greedy
    argmax) per request, in input order. Contexts too long for the model lose their oldest tokens;
    the continuation is always kept whole. share_context=False runs every request on its own
    (for benchmarks: the results are the same)."""
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
    # a one-token continuation is read off the context's last position, so requests that share
    # their context and continue it by one token (the A/B/C/D of a multiple-choice question)
    # share one forward: a job is (input, its rows, whether it is such a shared job)
    jobs: list[tuple[list[int], list[int], bool]] = []
    shared: dict[tuple[int, ...], int] = {}
    for i, (inp, _, n_cont) in enumerate(rows):
        if n_cont == 1 and share_context:
            key = tuple(inp)
            if key not in shared:
                shared[key] = len(jobs)
                jobs.append((inp, [], True))
            jobs[shared[key]][1].append(i)
        else:
            jobs.append((inp, [i], False))
    # longest first: each batch pads to its first row, so similar lengths waste the least compute
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][0]))
    device = next(model.parameters()).device
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = len(jobs[idx[0]][0])
        x = torch.zeros(len(idx), T, dtype=torch.long)  # pad id 0: never read by a real token
        for r, j in enumerate(idx):
            x[r, : len(jobs[j][0])] = torch.tensor(jobs[j][0])
        states, head = _states_and_head(model, x.to(device))
        for r, j in enumerate(idx):
            inp, members, one_token = jobs[j]
            if one_token:
                last = head(states[r, len(inp) - 1 : len(inp)])[0]  # (V,): after the context
                best = int(last.argmax())
                for i in members:
                    t = rows[i][1][-1]
                    out[i] = (float(last[t]), best == t)
                continue
            (i,) = members
            n_cont = rows[i][2]
            y = torch.tensor(rows[i][1][-n_cont:], device=device)
            scored = states[r, len(inp) - n_cont : len(inp)]  # the positions predicting y
            total, greedy = 0.0, True
            for c in range(0, n_cont, HEAD_CHUNK):
                lp = head(scored[c : c + HEAD_CHUNK])  # (<= HEAD_CHUNK, V)
                yc = y[c : c + HEAD_CHUNK]
                total += float(lp.gather(-1, yc[:, None]).sum())
                greedy = greedy and bool((lp.argmax(-1) == yc).all())
            out[i] = (total, greedy)
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
