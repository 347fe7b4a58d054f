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

from dataclasses import dataclass

import numpy as np

from lmforge.config import ConfigError
from lmforge.tokenizer import Tokenizer

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
    """The tokenizer's <extra_id_0..n-1>, else n new ids after its vocabulary, <extra_id_0>
    the last (T5's layout: the pretrained T5 tokenizer counts down from 32099)."""
    try:
        return Sentinels([tokenizer.token_id(SENTINEL.format(k)) for k in range(n)], new=False)
    except KeyError:
        base = tokenizer.vocab_size
        return Sentinels([base + n - 1 - k for k in range(n)], new=True)


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
