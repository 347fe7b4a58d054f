"""T5's span-corruption pretraining objective: drop random spans from the input, predict them.

The one idea (Raffel et al., arXiv:1910.10683, section 3.1.4; T5's `random_spans_noise_mask`):
mark `noise_density` (15%) of the tokens as noise, in spans whose mean length is
`mean_span` (3), placed at random; the encoder's input keeps the other tokens with each noise
span replaced by one sentinel (<extra_id_0>, <extra_id_1>, ...), and the decoder's target is
each sentinel followed by the span it hides, then EOS:

    tokens   a b c d e f g h      (noise: c d, g)
    input    a b <0> e f <1> h </s>      target   <0> c d <1> g </s>

The noise and non-noise tokens are each split into the same number of spans at random (every
span at least one token), then interleaved starting with a non-noise span, as T5 does, so the
sequence never starts with noise.

Sentinels are the tokenizer's own `<extra_id_k>` tokens when it has them; otherwise they are
new ids after its vocabulary, laid out as T5's (<extra_id_0> the last id, counting down).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError
from lmforge.io import write_json
from lmforge.model.t5 import T5
from lmforge.tokenizer import Tokenizer

IGNORE = -100  # label of a padded target position

SENTINEL = "<extra_id_{}>"


def segment_lengths(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """n_items split at random into n_segments runs of at least one item: (n_segments,) ints."""
    cuts = rng.permutation(n_items - 1)[: n_segments - 1] + 1  # distinct cut points in 1..n-1
    bounds = np.concatenate([[0], np.sort(cuts), [n_items]])
    return np.diff(bounds)


def noise_mask(
    length: int, rng: np.random.Generator, noise_density: float = 0.15, mean_span: float = 3.0
) -> np.ndarray:
    """(length,) bool: the noise tokens, round(length * density) of them (at least 1, at most
    length - 1) in round(noise / mean_span) spans (at least 1); starts with a non-noise span,
    ends with a noise span."""
    if length < 2:
        raise ConfigError(f"span corruption needs at least 2 tokens, got {length}")
    if not 0 < noise_density < 1:
        raise ConfigError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_span < 1:
        raise ConfigError(f"mean_span must be at least 1, got {mean_span}")
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span)), 1)
    n_spans = min(n_spans, length - n_noise)  # each non-noise span needs a token too
    noise = segment_lengths(n_noise, n_spans, rng)
    keep = segment_lengths(length - n_noise, n_spans, rng)
    runs = np.stack([keep, noise], 1).reshape(-1)  # keep_0, noise_0, keep_1, noise_1, ...
    return np.repeat(np.tile([False, True], n_spans), runs)


def corrupt(
    tokens, mask: np.ndarray, sentinels: list[int], eos_id: int
) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of tokens with the noise spans of mask taken out: each span is
    one sentinel in the input; the target is every sentinel followed by its span; both end
    with EOS."""
    inputs, targets, k = [], [], -1
    for i, (tok, noisy) in enumerate(zip(tokens, mask)):
        if not noisy:
            inputs.append(int(tok))
            continue
        if i == 0 or not mask[i - 1]:  # a span starts: one sentinel for all of it
            k += 1
            if k >= len(sentinels):
                raise ConfigError(
                    f"{k + 1} noise spans but only {len(sentinels)} sentinel tokens: "
                    "shorten the sequences or add sentinels"
                )
            inputs.append(sentinels[k])
            targets.append(sentinels[k])
        targets.append(int(tok))
    return inputs + [eos_id], targets + [eos_id]


@dataclass(frozen=True)
class Sentinels:
    ids: list[int]  # ids[k] is <extra_id_k>
    new: bool  # appended after the tokenizer's ids (the model's vocabulary must hold them)

    @property
    def vocab_needed(self) -> int:
        return max(self.ids) + 1


def sentinels(tokenizer: Tokenizer, n: int = 100) -> Sentinels:
    """The tokenizer's <extra_id_0..n-1>, else (it has none) n new ids after its vocabulary,
    <extra_id_0> the last (T5's layout: the pretrained T5 tokenizer counts down from 32099).
    A tokenizer with only some of them is refused: new ones would repeat the names."""
    have = [k for k in range(n) if _has(tokenizer, k)]
    if not have:
        base = tokenizer.vocab_size
        return Sentinels([base + n - 1 - k for k in range(n)], new=True)
    if len(have) < n:
        raise ConfigError(
            f"the tokenizer has {len(have)} of the {n} sentinel tokens <extra_id_0..{n - 1}>: "
            f"use at most {len(have)} sentinels (shorter sequences) or a tokenizer with all or none"
        )
    return Sentinels([tokenizer.token_id(SENTINEL.format(k)) for k in range(n)], new=False)


def _has(tokenizer: Tokenizer, k: int) -> bool:
    try:
        tokenizer.token_id(SENTINEL.format(k))
        return True
    except KeyError:
        return False


def save_tokenizer(tokenizer: Tokenizer, sent: Sentinels, out: str | Path) -> None:
    """The tokenizer files, with appended sentinels written in as special tokens at their ids
    (so the saved tokenizer, and transformers', encode and decode `<extra_id_k>`)."""
    out = Path(out)
    tokenizer.save(out)
    if not sent.new:
        return
    entries = [
        dict(
            id=i,
            content=SENTINEL.format(k),
            single_word=False,
            lstrip=False,
            rstrip=False,
            normalized=False,
            special=True,
        )  # fmt: skip
        for k, i in sorted(enumerate(sent.ids), key=lambda e: e[1])
    ]
    tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"].extend(entries)
    write_json(out / "tokenizer.json", tok)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    extra = [e["content"] for e in sorted(entries, key=lambda e: -e["id"])]  # <extra_id_0> first
    cfg["extra_ids"] = len(extra)
    cfg["additional_special_tokens"] = cfg.get("additional_special_tokens", []) + extra
    write_json(cfg_file, cfg)


def span_corrupt(
    tokens,
    sentinel_ids: list[int],
    eos_id: int,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[list[int], list[int]]:
    """One example: (encoder input ids, decoder target ids) with fresh random spans."""
    mask = noise_mask(len(tokens), rng, noise_density, mean_span)
    return corrupt(tokens, mask, sentinel_ids, eos_id)


# --- training: one optimizer step of span corruption, the `train_step` train/loop.py:fit runs


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, start_id: int):
    """(input, target) id lists -> inputs (B, S), attention_mask (B, S), decoder inputs
    (B, T) (the targets shifted right behind the start id) and labels (B, T) (IGNORE where
    padded), each row padded to the longest."""
    S = max(len(i) for i, _ in pairs)
    T = max(len(t) for _, t in pairs)
    inputs = torch.full((len(pairs), S), pad_id, dtype=torch.long)
    dec = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), S), dtype=torch.long)
    for r, (i, t) in enumerate(pairs):
        inputs[r, : len(i)] = torch.tensor(i)
        mask[r, : len(i)] = 1
        labels[r, : len(t)] = torch.tensor(t)
        dec[r, : len(t)] = torch.tensor([start_id, *t[:-1]])
    return inputs, mask, dec, labels


def span_loss(model: T5, inputs, attention_mask, dec, labels) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the target tokens, their count)."""
    logits = model(inputs, dec, attention_mask=attention_mask)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
    return loss, int((labels != IGNORE).sum())


def span_train_step(
    model: T5,
    optimizer: torch.optim.Optimizer,
    sequences: Iterator[list[list[int]]],
    sentinel_ids: list[int],
    seed: int = 0,
    grad_clip: float = 1.0,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> Callable[[int], dict]:
    """The `train_step(step)` fit runs: a batch of token sequences from `sequences`, spans
    drawn by a generator seeded by the step (a resumed run corrupts as the first one did), one
    optimizer step on the loss per target token. grad_clip 0 = no clipping."""
    cfg = model.cfg

    def train_step(step: int) -> dict:
        rng = np.random.default_rng(seed * 1_000_003 + step)
        pairs = [
            span_corrupt(seq, sentinel_ids, cfg.eos_token_id, rng, noise_density, mean_span)
            for seq in next(sequences)
        ]
        inputs, mask, dec, labels = collate(pairs, cfg.pad_token_id, cfg.decoder_start_token_id)
        dev = model.tok_emb.weight.device
        loss, n = span_loss(model, *(t.to(dev) for t in (inputs, mask, dec, labels)))
        (loss / max(n, 1)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": (loss.detach(), n), "grad_norm": grad_norm, "tokens": int(mask.sum())}

    return train_step
