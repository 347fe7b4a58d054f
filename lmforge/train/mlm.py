"""Masked-language-model pretraining of the BERT encoder, on the common training clock.

The one idea (BERT, arXiv:1810.04805, section 3.1): pick 15% of the real tokens as targets; of
those, 80% are replaced by [MASK], 10% by a random token and 10% kept, so the encoder cannot
learn that only [MASK] positions matter (at fine-tuning time there is no [MASK]). The loss is
cross-entropy at the targets only. `mlm_train_step` is the stage's `train_step` for
`train/loop.py:fit`; the clock (schedule, logging, saving, Ctrl-C) is fit's.

`lmforge pretrain` with `model.arch: bert` runs `train` below (train/pretrain.py picks it by the
model family) on the decoder's packed token shards: a window of the packed stream is one
example, documents joined by their BOS/EOS as RoBERTa's FULL-SENTENCES packing joins them, so
there is no padding. A tokenizer without a mask token gets `<|mask|>` appended after its last id:
the shards never hold it, so the data need not be prepared again, and the model's vocabulary is
one id larger than the tokenizer's. The model is saved in BertForMaskedLM's layout with that
tokenizer (`mask_token` set), so transformers' fill-mask pipeline opens it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.config import ConfigError, ModelConfig, PretrainConfig, config_hash
from lmforge.data.loader import PackedLoader, val_batches, val_languages
from lmforge.io import atomic_dir, write_json
from lmforge.model.bert import Bert, BertConfig, from_hf_state_dict, save_bert
from lmforge.model.transformer import flops_per_token
from lmforge.perf import autocast, pick_device
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import resume_latest, save_step
from lmforge.train.heldout import val_row
from lmforge.train.loop import fit
from lmforge.train.metrics import plot_losses
from lmforge.train.optim import make_optimizer
from lmforge.train.run_dir import run_config, start_run

IGNORE = -100  # cross_entropy's ignore_index: positions that are not targets


def mask_tokens(
    ids: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    p: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T), special (B, T) bool (padding, [CLS], [SEP]: never targets) -> (inputs,
    labels): labels hold the original id at the targets and IGNORE elsewhere."""
    draw = torch.rand(ids.shape, generator=generator)
    target = (draw < p) & ~special
    labels = torch.where(target, ids, IGNORE)
    kind = torch.rand(ids.shape, generator=generator)  # 80 / 10 / 10 within the targets
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator)
    inputs = torch.where(target & (kind < 0.8), mask_id, ids)
    inputs = torch.where(target & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
    return inputs, labels


def mlm_loss(model: Bert, inputs, labels, attention_mask) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the targets, number of targets)."""
    logits = model.mlm_logits(model(inputs, attention_mask))  # (B, T, V)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((labels != IGNORE).sum())


def mlm_train_step(
    model: Bert,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    mask_id: int,
    seed: int = 0,
    grad_clip: float = 1.0,
    p: float = 0.15,
    grad_accum: int = 1,
    device: torch.device | str = "cpu",
) -> Callable[[int], dict]:
    """The `train_step(step)` fit runs: `grad_accum` batches (ids, attention_mask, special) from
    `batches`, masked with a generator seeded by the step (a resumed run masks as the first one
    did), one optimizer step. grad_clip 0 = no clipping."""
    device = torch.device(device)

    def train_step(step: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        micro = []
        for _ in range(grad_accum):  # masked on the CPU: the same targets on every device
            ids, attention_mask, special = next(batches)
            inputs, labels = mask_tokens(ids, special, mask_id, model.cfg.vocab_size, g, p)
            micro.append((inputs, labels, attention_mask))
        # every target weighs the same however the micro-batches split them: divide by the total
        n = sum(int((labels != IGNORE).sum()) for _, labels, _ in micro)
        loss_sum = torch.zeros((), device=device)
        for inputs, labels, attention_mask in micro:
            args = (t.to(device, non_blocking=True) for t in (inputs, labels, attention_mask))
            with autocast(device):
                loss, _ = mlm_loss(model, *args)
            (loss / max(n, 1)).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # a ratio of sums: the loss per target token, however many targets each batch drew
        tokens = sum(int(a.sum()) for _, _, a in micro)
        return {"loss": (loss_sum, n), "grad_norm": grad_norm, "tokens": tokens}

    return train_step


@torch.no_grad()
def mlm_evaluate(
    model: Bert,
    data_dir,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    special: torch.Tensor,
    mask_id: int,
    p: float,
    device,
) -> dict:
    """Held-out masked-LM loss (nats per target) and accuracy (the top logit is the original
    token) for each language, on the validation windows the causal stage scores. The masking
    generator restarts at seed 0 for every language: each evaluation of a run scores the same
    targets, so the numbers move only with the model."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = {}
    for lang in val_languages(data_dir):
        g = torch.Generator().manual_seed(0)
        loss, correct, n = 0.0, 0, 0
        for x, _ in val_batches(data_dir, lang, seq_len, batch_size, max_tokens):
            inputs, labels = mask_tokens(x, special[x], mask_id, model.cfg.vocab_size, g, p)
            target = labels != IGNORE
            with autocast(device):
                logits = model.mlm_logits(model(inputs.to(device)))  # (B, T, V); no padding
            logits, labels = logits[target.to(device)].float(), labels[target].to(device)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            n += len(labels)
        if n:  # "tokens": the targets scored
            out[lang] = {"loss": loss / n, "acc": correct / n, "tokens": n}
    model.train(was_training)
    return out


# --- the mask token and the encoder's config

MASK_TOKENS = ("[MASK]", "<mask>", "<|mask|>")  # BERT's, RoBERTa's, the one we append
NEW_MASK = "<|mask|>"


@dataclass(frozen=True)
class MaskToken:
    token: str
    id: int
    new: bool  # appended to the tokenizer after its last id (the saved tokenizer gets it)


def mask_token(tokenizer: Tokenizer) -> MaskToken:
    """The tokenizer's own mask token, else `<|mask|>` at the first unused id."""
    for t in MASK_TOKENS:
        if t in tokenizer.special_tokens():
            return MaskToken(t, tokenizer.token_id(t), new=False)
    return MaskToken(NEW_MASK, tokenizer.vocab_size, new=True)


def encoder_vocab(model_cfg: ModelConfig, tokenizer: Tokenizer) -> tuple[ModelConfig, MaskToken]:
    """model.vocab_size filled in (0 = the tokenizer's, plus the appended mask token) and the
    mask token; refused when a vocabulary given explicitly leaves no id for the mask."""
    mask = mask_token(tokenizer)
    need = max(tokenizer.vocab_size, mask.id + 1)
    if model_cfg.vocab_size and model_cfg.vocab_size < need:
        why = (
            f"the tokenizer ({tokenizer.vocab_size:,} ids) has no mask token ({', '.join(MASK_TOKENS)}), "
            f"and appending {NEW_MASK} needs {need:,} ids"
            if mask.new
            else f"the tokenizer has {tokenizer.vocab_size:,} ids"
        )
        raise ConfigError(
            f"model.vocab_size ({model_cfg.vocab_size:,}) is too small for masked-LM: {why}; "
            f"set model.vocab_size to 0 (derived) or at least {need:,}"
        )
    vocab = model_cfg.vocab_size or need
    model_cfg = dataclasses.replace(
        model_cfg, vocab_size=vocab, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id
    )
    return model_cfg, mask


def bert_config(cfg: ModelConfig, pad_token_id: int) -> BertConfig:
    """The `model:` section (arch bert) as the encoder's own config."""
    return BertConfig(
        vocab_size=cfg.vocab_size, dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head,
        ffn_dim=cfg.ffn_dim, max_seq_len=cfg.max_seq_len, norm_eps=cfg.norm_eps,
        init_std=cfg.init_std, pad_token_id=pad_token_id,
    )  # fmt: skip


def special_ids(tokenizer: Tokenizer, vocab_size: int, mask: MaskToken) -> torch.Tensor:
    """(V,) bool: the ids that are never targets: the tokenizer's special tokens (BOS, EOS,
    padding, chat markers), the mask token and the ids past the tokenizer's (a padded
    vocabulary), which no text holds."""
    special = torch.zeros(vocab_size, dtype=torch.bool)
    special[[tokenizer.token_id(t) for t in tokenizer.special_tokens()]] = True
    special[min(tokenizer.vocab_size, vocab_size) :] = True
    special[mask.id] = True
    return special


def packed_batches(loader: PackedLoader, special: torch.Tensor) -> Iterator:
    """(ids, attention_mask, special) from the packed loader's windows: no padding, so every
    position is attended to; the causal targets (the window shifted by one) are not needed."""
    while True:
        x, _ = loader.next_batch()
        yield x, torch.ones_like(x), special[x]


# --- saving: BertForMaskedLM's layout and the tokenizer with its mask token


def save_tokenizer(tokenizer: Tokenizer, mask: MaskToken, out: Path) -> None:
    """The tokenizer files with `mask_token` named, and a new mask token added as a special
    token at its id, as transformers reads them (AutoTokenizer: .mask_token, fill-mask)."""
    tokenizer.save(out)
    entry = dict(content=mask.token, lstrip=False, normalized=False, rstrip=False,
                 single_word=False, special=True)  # fmt: skip
    if mask.new:
        tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        tok["added_tokens"].append({"id": mask.id, **entry})
        write_json(out / "tokenizer.json", tok)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((out / name).read_text(encoding="utf-8"))
        cfg["mask_token"] = mask.token
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"][str(mask.id)] = entry
        write_json(out / name, cfg)


def save_encoder(model: Bert, out: Path, tokenizer: Tokenizer, mask: MaskToken) -> None:
    """config.json + model.safetensors (BertForMaskedLM) + the tokenizer files."""
    save_bert(model, out)
    save_tokenizer(tokenizer, mask, out)


def read_encoder(model: Bert, ckpt: Path) -> None:
    """Weights from a directory save_encoder wrote, into `model` in place (resume)."""
    tensors = load_file(str(ckpt / "model.safetensors"), device=str(model.tok_emb.weight.device))
    model.load_state_dict(from_hf_state_dict(tensors, model.cfg))


# --- the driver


def train(
    cfg: PretrainConfig,
    model_cfg: ModelConfig,
    mask: MaskToken,
    data_dir: Path,
    tokenizer: Tokenizer,
    out_dir: Path,
    manifest: dict,
    info,
) -> dict:
    """Masked-LM pretraining from scratch (`lmforge pretrain` with model.arch bert; the data
    and tokenizer are checked by train/pretrain.py). Returns the summary it writes."""
    # --- setup
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"pretrain.seq_len ({cfg.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len})"
        )
    config = run_config(cfg, model_cfg)
    config["data"] = config_hash(manifest)
    start_run(out_dir, "pretrain", config, cfg.resume, cfg.overwrite, info)
    torch.manual_seed(cfg.seed)
    model = Bert(bert_config(model_cfg, tokenizer.pad_id), mlm_head=True).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, cfg, device)
    loader = PackedLoader(data_dir, cfg.seq_len, cfg.batch_size, cfg.seed)
    special = special_ids(tokenizer, model_cfg.vocab_size, mask)
    ckpt_root = out_dir / "checkpoints"
    resumed = resume_latest(
        ckpt_root, model, optimizer, loader, cfg.resume, info,
        read_weights=lambda d: read_encoder(model, d),
    )  # fmt: skip
    write_json(out_dir / "model_config.json", dataclasses.asdict(model_cfg))
    train_step = mlm_train_step(
        model, optimizer, packed_batches(loader, special), mask.id, cfg.seed, cfg.grad_clip,
        cfg.mask_fraction, cfg.grad_accum, device,
    )  # fmt: skip
    evals: dict[int, dict] = {}

    def run_eval(step: int) -> dict:
        args = (cfg.seq_len, cfg.batch_size, cfg.eval_tokens, special, mask.id, cfg.mask_fraction)
        evals[step] = mlm_evaluate(model, data_dir, *args, device)
        return val_row(evals[step])

    def write(d: Path) -> None:
        save_encoder(model, d, tokenizer, mask)

    def save(step: int, loop_state: dict) -> None:
        save_step(
            ckpt_root, step, model, optimizer, loader.state_dict(), info, cfg.keep_last,
            write_weights=write, extra={"log": loop_state},
        )  # fmt: skip

    # --- loop
    model.train()
    done = fit(
        cfg, optimizer, train_step, run_eval, save, out_dir=out_dir, desc="pretrain (masked LM)",
        resumed=resumed, info=info, device=device,
        eval_at_start=True,  # the untrained encoder's scores: the baseline the run improves on
        # a decoder's count, near enough: learned positions and the head's dense layer are small
        flops_per_token=flops_per_token(model_cfg, cfg.seq_len),
    )  # fmt: skip
    if not done["interrupted"]:
        with atomic_dir(out_dir / "model") as tmp:
            write(tmp)

    # --- outputs
    summary = {
        "objective": "masked-lm",
        "step": done["step"],
        "max_steps": cfg.max_steps,
        "interrupted": done["interrupted"],
        "params": n_params,
        "tokens_per_step": cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        "device": str(device),
        "train_seconds": done["train_seconds"],
        "peak_memory_mb": done["peak_memory_mb"],
        "mask": {"token": mask.token, "id": mask.id, "appended": mask.new},
        "mask_fraction": cfg.mask_fraction,
        "val": evals[max(evals)] if evals else {},
        "val_start": evals.get(0, {}),
        "model": dataclasses.asdict(model_cfg),
    }
    if "tokens_per_s" in done:
        summary["tokens_per_s"] = done["tokens_per_s"]
    if not done["interrupted"]:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png", title="masked-LM loss")
    write_json(out_dir / "summary.json", summary)
    return summary
