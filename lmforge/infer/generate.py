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
    # a tiny or huge penalty overflows to +-inf (inf - inf = NaN in softmax): stay finite
    big = torch.finfo(penalised.dtype).max
    return torch.where(seen, penalised.clamp(-big, big), logits)


def special_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids that are never text: the tokenizer's special tokens (BOS, pad, chat markers,
    reserved) and the model's rows past the tokenizer's vocabulary (padding to a round size).
    A stand-in tokenizer without `special_tokens` has none."""
    if not hasattr(tokenizer, "special_tokens"):
        return []
    ids = {tokenizer.token_id(t) for t in tokenizer.special_tokens()}
    ids.update(range(tokenizer.vocab_size, vocab_size))
    return sorted(i for i in ids if i < vocab_size)


def banned_mask(
    specials: Sequence[int], stop_ids: Sequence[int], vocab_size: int, device=None
) -> torch.Tensor | None:
    """(1, V) bool, True for the ids sampling must never pick: every special id that is not one
    of the request's stop ids (those end the reply and must stay reachable). With no stop ids
    (ignore_eos) EOS is banned too: generation runs to max_tokens on ordinary tokens, and a
    special token never appears in the text. None when nothing is banned."""
    ids = sorted(set(specials) - set(stop_ids))
    if not ids:
        return None
    mask = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
    mask[0, ids] = True
    return mask


def ban_tokens(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) with the banned ids (a (1, V) or (B, V) bool mask) at -inf."""
    return logits if banned is None else logits.masked_fill(banned, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): greedy at temperature 0, else temperature, then top-k,
    then top-p (the smallest set of tokens whose probability reaches top_p). The most likely
    token always survives top-k and top-p, however small top_p is."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shift so the largest is 0 before dividing: a tiny temperature cannot overflow to inf
    logits = logits - logits.max(dim=-1, keepdim=True).values
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already enough
        drop[:, 0] = False  # top_p ~ 0 would drop every token (all -inf -> NaN probabilities)
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
    banned: Sequence[int] = (),
    constraint=None,
) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1) until max_new_tokens, a stop id or the end
    of the context. A stop id is yielded last so callers can tell why generation ended.
    `banned` ids are never sampled, greedy included (`stream_text` bans the tokenizer's special
    tokens other than the stop ids). A `constraint` (infer/constrain.py) masks every token its
    grammar does not allow and is advanced by each token; generation ends when it is finished.
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
    ban = banned_mask(banned, stop, cfg.vocab_size, device)
    if device.type == "cpu" and isinstance(model, GPT) and CpuDecoder.supports(model):
        decoder = CpuDecoder(model)
        logits = decoder.prefill(ids[0], cache).view(1, -1)
    else:
        decoder = None
        logits = model(ids, cache, 0, last_only=True)[:, -1]  # prefill
    for i in range(steps):
        logits = ban_tokens(apply_repetition_penalty(logits, seen, repetition_penalty), ban)
        if constraint is not None:
            logits = ban_tokens(logits, constraint.banned(device))
        nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (1,)
        tok = int(nxt.item())  # the one host sync per token: the caller needs the id
        yield tok
        if tok in stop or i == steps - 1:
            return
        if constraint is not None:
            constraint.advance(tok)
            if constraint.finished:
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
    `stopped` is set and the text before it is the last piece.

    Each token costs the same however long the text already is: only a window of the last few
    ids is decoded (the text a new token adds is decode(window) minus decode(window without
    it), as vLLM does, so a decoder that treats the first token specially still gives the same
    text), and each stop string is matched by a KMP automaton fed only the new characters, whose
    state is also the length of the tail that must be held back."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_at = self.read_at = 0  # window start; ids before read_at are in the text
        self.matchers = [_StopMatcher(s) for s in self.stop]
        self.pending = ""  # decoded text not handed out yet (at most a stop's length - 1)
        self.pieces: list[str] = []  # everything handed out so far
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.stopped:
            return ""
        new = self._decode_new(final=False)
        if new is None:  # a multi-byte character is not complete yet
            return ""
        # where each stop string first ends in the new text -> where it starts in pending + new
        ends = [(m.feed(new), len(m.stop)) for m in self.matchers]
        starts = [max(len(self.pending) + end + 1 - n, 0) for end, n in ends if end >= 0]
        self.pending += new
        if starts:  # earlier text had no stop string, so this is its first appearance
            self.stopped = True
            return self._emit(min(starts))
        hold = max((m.state for m in self.matchers), default=0)  # could still become a stop
        return self._emit(len(self.pending) - hold)

    def flush(self) -> str:
        """The held-back tail, when generation ends without a stop string."""
        if self.stopped:
            return ""
        self.pending += self._decode_new(final=True)
        return self._emit(len(self.pending))

    def _decode_new(self, final: bool) -> str | None:
        """The text the ids after read_at add, or None while it ends in an unfinished UTF-8
        character (unless `final`, or the wait has grown past MAX_PENDING_IDS: then it is not a
        character being completed but invalid bytes, and waiting longer would not help)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_at : self.read_at])
        after = decode(self.ids[self.prefix_at :])
        waiting = len(self.ids) - self.read_at
        if not final and after.endswith("\ufffd") and waiting < MAX_PENDING_IDS:
            return None
        self.prefix_at, self.read_at = self.read_at, len(self.ids)
        return after[len(before) :]

    def _emit(self, end: int) -> str:
        piece, self.pending = self.pending[:end], self.pending[end:]
        if piece:
            self.pieces.append(piece)
        return piece


MAX_PENDING_IDS = 16  # ids an unfinished UTF-8 character may wait for (one needs at most 4)


class _StopMatcher:
    """Knuth-Morris-Pratt over a stream: `state` is the length of the longest prefix of the stop
    string that the text seen so far ends with; the stop string has appeared when it reaches
    len(stop). Feeding n characters costs O(n) amortised, whatever the text before them."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self.fail = [0] * len(stop)  # fail[i]: longest proper border of stop[: i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, text: str) -> int:
        """Advance over `text`; the index in it where the stop string first ends, or -1."""
        k, stop, fail = self.state, self.stop, self.fail
        for j, c in enumerate(text):
            while k and c != stop[k]:
                k = fail[k - 1]
            if c == stop[k]:
                k += 1
            if k == len(stop):
                self.state = k
                return j
        self.state = k
        return -1


def stream_text(
    model, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (), **kwargs
) -> Iterator[str]:
    """Decode `generate` incrementally into text pieces, stopping before a stop string. Special
    tokens other than the stop ids are never sampled: they are not text."""
    stop_ids = kwargs.pop("stop_ids", (tokenizer.eos_id,))
    stream = TextStream(tokenizer, stop)
    banned = special_ids(tokenizer, model.cfg.vocab_size) if model is not None else ()
    for tok in generate(model, prompt_ids, stop_ids=stop_ids, banned=banned, **kwargs):
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
