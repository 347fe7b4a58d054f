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

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.config import ConfigError, config_hash
from lmforge.data.loader import PackedLoader, val_batches, val_languages
from lmforge.io import atomic_dir, write_json
from lmforge.model.t5 import T5, T5Config, from_hf_state_dict, save_t5
from lmforge.perf import pick_device
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import resume_latest, save_step
from lmforge.train.heldout import val_row
from lmforge.train.loop import fit
from lmforge.train.metrics import plot_losses
from lmforge.train.optim import make_optimizer
from lmforge.train.run_dir import run_config, start_run

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


# --- `lmforge pretrain` with model.arch t5: the recipe's packed shards, span-corrupted

MEAN_SPAN = 3.0  # T5's mean noise span length (the paper's default; not a recipe field)


def t5_config(model_cfg, tokenizer: Tokenizer, sent: Sentinels) -> T5Config:
    """The `model:` section (arch t5) as T5's config: the vocabulary holds the tokenizer and
    its sentinels (model.vocab_size 0 = exactly that; smaller is refused by name), padding is
    the tokenizer's pad id, which is also the decoder's start id, as in T5."""
    need = max(tokenizer.vocab_size, sent.vocab_needed)
    if model_cfg.vocab_size and model_cfg.vocab_size < need:
        raise ConfigError(
            f"model.vocab_size ({model_cfg.vocab_size:,}) is too small for T5: the tokenizer "
            f"and its {len(sent.ids)} sentinel tokens need {need:,} ids; set it to 0 (derived)"
        )
    return T5Config(
        vocab_size=model_cfg.vocab_size or need, dim=model_cfg.dim, d_kv=model_cfg.head_dim,
        ffn_dim=model_cfg.ffn_dim, n_layer=model_cfg.n_layer, n_decoder_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head, norm_eps=model_cfg.norm_eps,
        tie_embeddings=model_cfg.tie_embeddings, pad_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eos_id, decoder_start_token_id=tokenizer.pad_id,
    )  # fmt: skip


def packed_sequences(loader: PackedLoader) -> Iterator[list[list[int]]]:
    """The packed loader's windows as token lists, one per example (documents joined by their
    BOS/EOS, as T5 packs C4); the causal targets are not needed."""
    while True:
        x, _ = loader.next_batch()
        yield x.tolist()


@torch.no_grad()
def span_evaluate(model: T5, data_dir, seq_len, batch_size, max_tokens, sent, noise) -> dict:
    """Held-out span-corruption loss (nats per target token) for each language, on the
    validation windows the causal stage scores; the spans are drawn from seed 0 for every
    evaluation, so the numbers move only with the model."""
    was_training = model.training
    model.eval()
    dev = model.tok_emb.weight.device
    cfg, out = model.cfg, {}
    for lang in val_languages(data_dir):
        rng = np.random.default_rng(0)
        loss, n = 0.0, 0
        for x, _ in val_batches(data_dir, lang, seq_len, batch_size, max_tokens):
            pairs = [span_corrupt(s, sent.ids, cfg.eos_token_id, rng, noise, MEAN_SPAN)
                     for s in x.tolist()]  # fmt: skip
            batch = collate(pairs, cfg.pad_token_id, cfg.decoder_start_token_id)
            s, k = span_loss(model, *(t.to(dev) for t in batch))
            loss, n = loss + s.item(), n + k
        if n:
            out[lang] = {"loss": loss / n, "tokens": n}
    model.train(was_training)
    return out


def refuse_unsupported(cfg) -> None:
    """The pretrain options the T5 driver does not implement, refused by name."""
    given = [k for k in ("init_from", "replay_fraction") if getattr(cfg, k)]
    given += ["grad_accum"] if cfg.grad_accum != 1 else []
    if given:
        raise ConfigError(
            f"pretrain.{', pretrain.'.join(given)}: not supported for model.arch t5 (span "
            "corruption trains from scratch on one data folder, one batch a step)"
        )


def train(cfg, model_cfg, data_dir: Path, tokenizer: Tokenizer, out_dir: Path, manifest, info):
    """Span-corruption pretraining of a T5 from scratch (`lmforge pretrain`, model.arch t5;
    data and tokenizer checked by train/pretrain.py). pretrain.mask_fraction is the noise
    density. Saves T5ForConditionalGeneration's layout with the tokenizer (and its sentinels)
    in out_dir/model; returns the summary it writes."""
    refuse_unsupported(cfg)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sent = sentinels(tokenizer)
    t5_cfg = t5_config(model_cfg, tokenizer, sent)
    config = run_config(cfg, model_cfg)
    config["data"] = config_hash(manifest)
    start_run(out_dir, "pretrain", config, cfg.resume, cfg.overwrite, info)
    torch.manual_seed(cfg.seed)
    model = T5(t5_cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, cfg, device)
    loader = PackedLoader(data_dir, cfg.seq_len, cfg.batch_size, cfg.seed)
    ckpt_root = out_dir / "checkpoints"

    def read(d: Path) -> None:
        tensors = load_file(str(d / "model.safetensors"), device=str(device))
        model.load_state_dict(from_hf_state_dict(tensors, t5_cfg))

    resumed = resume_latest(
        ckpt_root, model, optimizer, loader, cfg.resume, info, read_weights=read
    )
    write_json(out_dir / "model_config.json", dataclasses.asdict(t5_cfg))
    train_step = span_train_step(
        model, optimizer, packed_sequences(loader), sent.ids, cfg.seed, cfg.grad_clip,
        cfg.mask_fraction, MEAN_SPAN,
    )  # fmt: skip
    evals: dict[int, dict] = {}

    def run_eval(step: int) -> dict:
        args = (cfg.seq_len, cfg.batch_size, cfg.eval_tokens, sent, cfg.mask_fraction)
        evals[step] = span_evaluate(model, data_dir, *args)
        return val_row(evals[step])

    def write(d: Path) -> None:
        save_t5(model, d)
        save_tokenizer(tokenizer, sent, d)

    def save(step: int, loop_state: dict) -> None:
        save_step(
            ckpt_root, step, model, optimizer, loader.state_dict(), info, cfg.keep_last,
            write_weights=write, extra={"log": loop_state},
        )  # fmt: skip

    model.train()
    done = fit(
        cfg, optimizer, train_step, run_eval, save, out_dir=out_dir,
        desc="pretrain (T5 span corruption)", resumed=resumed, info=info, device=device,
        eval_at_start=True,  # the untrained model's score: the baseline the run improves on
        flops_per_token=6 * n_params,  # near enough: each token passes one of the two stacks
    )  # fmt: skip
    if not done["interrupted"]:
        with atomic_dir(out_dir / "model") as tmp:
            write(tmp)
    summary = {
        "objective": "span-corruption",
        "step": done["step"],
        "max_steps": cfg.max_steps,
        "interrupted": done["interrupted"],
        "params": n_params,
        "device": str(device),
        "train_seconds": done["train_seconds"],
        "sentinels": {"n": len(sent.ids), "appended": sent.new},
        "noise_density": cfg.mask_fraction,
        "mean_span": MEAN_SPAN,
        "val": evals[max(evals)] if evals else {},
        "val_start": evals.get(0, {}),
        "model": dataclasses.asdict(t5_cfg),
    }
    if not done["interrupted"]:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png", title="span-corruption loss")
    write_json(out_dir / "summary.json", summary)
    return summary
