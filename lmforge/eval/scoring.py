"""Log-likelihood scoring: the one primitive behind multiple-choice benchmarks and perplexity.

A request is (context ids, continuation ids); the model reads context + continuation once and we
sum the log-probabilities of the continuation tokens only. Batches are right-padded: with causal
attention, padding after a row's last real token cannot change that row's logits, so padded and
one-at-a-time scoring agree. Requests that share a context share its forward: one-token
continuations read it once, longer ones continue a KV cache of it (TruthfulQA's answers).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from lmforge.config import ConfigError

HEAD_CHUNK = 1024  # positions per output-head call: 1024 x a 49k vocabulary x 4 B = 200 MB


def _states_and_head(model, x: torch.Tensor):
    """(states (B, T, .), head: states (N, .) -> log-probs (N, V)). For a model with `features`
    (the GPT) the states are the final hidden states and the output head runs later, on the
    positions that are scored only: full (B, T, V) logits of 16 five-shot MMLU prompts over a
    49k vocabulary are ~6 GB, and 8 windows of 8,192 tokens ~13 GB. Other models: logits."""
    if hasattr(model, "features"):
        return model.features(x), _gpt_head(model)
    return model(x), lambda logits: logits.float().log_softmax(-1)


def _gpt_head(model):
    """Final hidden states (N, dim) -> log-probs (N, V) through the model's output head."""
    return lambda h: model.lm_head(h).float().log_softmax(-1)


@torch.no_grad()
def loglikelihood(
    model,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 16,
    share_context: bool = True,
    desc: str = "score",
) -> list[tuple[float, bool]]:
    """(summed log-prob of the continuation, whether every continuation token is the greedy
    argmax) per request, in input order. Contexts too long for the model lose their oldest tokens;
    the continuation is always kept whole. share_context=False runs every request on its own
    (for benchmarks: the results are the same). A progress bar named `desc` counts tokens read."""
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
    prefixed: dict[tuple[int, ...], list[int]] = {}  # longer continuations of one context
    for i, (inp, _, n_cont) in enumerate(rows):
        if n_cont == 1 and share_context:
            key = tuple(inp)
            if key not in shared:
                shared[key] = len(jobs)
                jobs.append((inp, [], True))
            jobs[shared[key]][1].append(i)
        else:
            prefixed.setdefault(tuple(inp[: len(inp) - n_cont + 1]), []).append(i)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    cached = share_context and hasattr(model, "new_cache") and hasattr(model, "features")
    groups = []
    for prefix, members in prefixed.items():
        if cached and len(members) > 1:  # the TruthfulQA answers of one question
            groups.append((list(prefix), members))
        else:
            jobs += [(rows[i][0], [i], False) for i in members]
    # longest first: each batch pads to its first row, so similar lengths waste the least compute
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][0]))
    device = next(model.parameters()).device
    total_tokens = sum(len(j[0]) for j in jobs) + sum(
        len(p) + sum(rows[i][2] - 1 for i in m) for p, m in groups
    )
    bar = tqdm(total=total_tokens, desc=desc, unit="tok", unit_scale=True, leave=False)
    for prefix, members in groups:
        _score_after_prefix(model, prefix, members, rows, out, batch_size, device)
        bar.update(len(prefix) + sum(rows[i][2] - 1 for i in members))
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
            out[i] = _score_states(states[r, len(inp) - n_cont : len(inp)], rows[i], head, device)
        bar.update(sum(len(jobs[j][0]) for j in idx))
    bar.close()
    return out


def _score_states(scored: torch.Tensor, row, head, device) -> tuple[float, bool]:
    """(summed log-prob, all greedy) of a row's continuation from the states predicting it."""
    n_cont = row[2]
    y = torch.tensor(row[1][-n_cont:], device=device)
    total, greedy = 0.0, True
    for c in range(0, n_cont, HEAD_CHUNK):
        lp = head(scored[c : c + HEAD_CHUNK])  # (<= HEAD_CHUNK, V)
        yc = y[c : c + HEAD_CHUNK]
        total += float(lp.gather(-1, yc[:, None]).sum())
        greedy = greedy and bool((lp.argmax(-1) == yc).all())
    return total, greedy


def _score_after_prefix(model, prefix, members, rows, out, batch_size, device) -> None:
    """Continuations of one context: the context is read once into a KV cache, then each batch
    of continuations reads only its own tokens after a copy of that cache. The same sums as
    reading every request whole, to float rounding (the matmuls have other shapes)."""
    p = len(prefix)
    longest = max(rows[i][2] for i in members) - 1
    cache = model.new_cache(1, p + longest)
    h = model.features(torch.tensor([prefix], device=device), cache, 0)[0, -1:]  # predicts cont[0]
    head = _gpt_head(model)
    for start in range(0, len(members), batch_size):
        chunk = members[start : start + batch_size]
        R = max(rows[i][2] for i in chunk) - 1
        if R == 0:
            states = None
        else:
            batch = model.new_cache(len(chunk), p + R)
            for layer in range(len(batch.k)):  # the context's keys and values, one copy per row
                batch.k[layer][:, :, :p] = cache.k[layer][:, :, :p]
                batch.v[layer][:, :, :p] = cache.v[layer][:, :, :p]
            x = torch.zeros(len(chunk), R, dtype=torch.long)  # right-padded: never read back
            for r, i in enumerate(chunk):
                rest = rows[i][0][p:]
                x[r, : len(rest)] = torch.tensor(rest, dtype=torch.long)
            states = model.features(x.to(device), batch, p)  # (n, R, dim)
        for r, i in enumerate(chunk):
            n_cont = rows[i][2]
            scored = h if n_cont == 1 else torch.cat([h, states[r, : n_cont - 1]])
            out[i] = _score_states(scored, rows[i], head, device)


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
    scores = loglikelihood(model, requests, batch_size, desc="perplexity")
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
