"""Autoregressive generation with a KV cache: sampling rules, stop rules, streaming text.

The one idea: the prompt is run once (prefill) to fill the cache, then each step feeds one
token. Sampling is a pure function of logits, so the engine of later stages reuses it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmforge.config import ConfigError
from lmforge.infer.cpu_decode import CpuDecoder
from lmforge.model.transformer import GPT


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL/HF rule: a seen token's positive logit is divided by the penalty, a negative one
    multiplied, so the penalty always lowers its probability. logits (B, V), seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): greedy at temperature 0, else temperature, then top-k,
    then top-p (the smallest set of tokens whose probability reaches top_p)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def fit_prompt(
    ids: Sequence[int], max_seq_len: int, max_new_tokens: int, truncate: bool
) -> list[int]:
    """A prompt must leave room for at least one new token. Too long is an error unless
    `truncate`, which keeps the most recent tokens (left truncation)."""
    ids = list(ids)
    if not ids:
        raise ConfigError("the prompt is empty (it must contain at least one token, e.g. BOS)")
    room = max_seq_len - min(max_new_tokens, max_seq_len - 1)
    if len(ids) >= max_seq_len or (truncate and len(ids) > room):
        if not truncate:
            raise ConfigError(
                f"the prompt has {len(ids)} tokens but the model's context is {max_seq_len}; "
                "shorten it or pass --truncate to keep its last tokens"
            )
        ids = ids[-room:]
    return ids


@torch.inference_mode()
def generate(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1) until max_new_tokens, a stop id or the end
    of the context. A stop id is yielded last so callers can tell why generation ended.
    A `GPT` on a CPU decodes through `CpuDecoder` (same logits, a fraction of the per-token
    overhead); anything else, e.g. a model on CUDA, through its own cached forward."""
    cfg = model.cfg
    device = (
        getattr(model, "device", None) or next(model.parameters()).device
    )  # a GPT, or a wrapper
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    T = ids.shape[1]
    if T >= cfg.max_seq_len:
        raise ConfigError(f"the prompt has {T} tokens but the model's context is {cfg.max_seq_len}")
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    steps = min(max_new_tokens, cfg.max_seq_len - T)
    cache = model.new_cache(1, T + steps)
    seen = torch.zeros(1, cfg.vocab_size, dtype=torch.bool, device=device)
    seen[0, ids[0]] = True
    stop = set(stop_ids)
    if device.type == "cpu" and isinstance(model, GPT) and CpuDecoder.supports(model):
        decoder = CpuDecoder(model)
        logits = decoder.prefill(ids[0], cache).view(1, -1)
    else:
        decoder = None
        logits = model(ids, cache, 0, last_only=True)[:, -1]  # prefill
    for i in range(steps):
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (1,)
        tok = int(nxt.item())  # the one host sync per token: the caller needs the id
        yield tok
        if tok in stop or i == steps - 1:
            return
        if repetition_penalty != 1.0:
            seen[0, tok] = True
        if decoder is not None:
            logits = decoder.step(nxt, cache, T + i).view(1, -1)
        else:
            logits = model(nxt.view(1, 1), cache, T + i)[:, -1]


class TextStream:
    """Token ids in, text pieces out, for streaming. Holds back the bytes of an unfinished UTF-8
    character and any tail that could still become a stop string; once a stop string appears,
    `stopped` is set and the text before it is the last piece."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False
        self.text = ""  # everything handed out so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:  # earlier text had no stop string, so this is its first appearance
            self.stopped = True
            return self._emit(text, max(cut, self.emitted))
        hold = max(
            (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        return self._emit(text, len(text) - hold)

    def flush(self) -> str:
        """The held-back tail, when generation ends without a stop string."""
        return "" if self.stopped else self._emit(self.tokenizer.decode(self.ids), None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        self.text += piece
        return piece


def stream_text(
    model, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (), **kwargs
) -> Iterator[str]:
    """Decode `generate` incrementally into text pieces, stopping before a stop string."""
    stop_ids = kwargs.pop("stop_ids", (tokenizer.eos_id,))
    stream = TextStream(tokenizer, stop)
    for tok in generate(model, prompt_ids, stop_ids=stop_ids, **kwargs):
        if tok in stop_ids:
            break
        piece = stream.push(tok)
        if piece:
            yield piece
        if stream.stopped:
            return
    tail = stream.flush()
    if tail:
        yield tail
