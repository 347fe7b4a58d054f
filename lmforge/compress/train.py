"""The training loop the compression stages share: distillation trains a student, pruning
fine-tunes a pruned model to recover what it lost.

The one idea: a stage supplies only its loss, `loss_fn(model, x, y) -> (loss, logs)`, and a hook
run after every optimizer step (pruning re-applies its masks there). Everything else is
pretraining's, built from the same pieces: the packed loader's data order, AdamW and the
schedule, gradient accumulation and clipping, autocast, step checkpoints with exact resume
after Ctrl-C, metrics.jsonl and the loss plot, validation loss and bits per byte per language.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, DistConfig, PretrainConfig
from lmforge.data.loader import PackedLoader, read_manifest
from lmforge.model.load import load, model_source
from lmforge.model.transformer import GPT, num_params
from lmforge.perf import autocast, pick_device
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist
from lmforge.train.checkpoint import resume_latest, save_final, save_step
from lmforge.train.heldout import evaluate, val_row
from lmforge.train.loop import fit
from lmforge.train.metrics import plot_losses
from lmforge.train.optim import make_optimizer
from lmforge.train.run_dir import clean_run_dir

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]

# --------------------------------------------------------------------------- setup


def setup_device(cfg: PretrainConfig, info: dist.DistInfo | None = None) -> torch.device:
    """The stage's device (under torchrun, this rank's GPU), with cfg.threads set."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return dist.device_for(info or dist.DistInfo(), pick_device(cfg.device))


def load_float_model(model_dir, device, stage: str) -> tuple[GPT, Tokenizer, Path]:
    """(model, tokenizer, the folder with its tokenizer files) for a stage that trains a float
    model: a model directory, or a LoRA adapter merged into its base; a ConfigError naming the
    stage says why model_dir is neither (a quantized checkpoint is refused)."""
    try:
        model, tokenizer = load(model_dir, device=device, trainable=True)
        return model, tokenizer, model_source(model_dir)
    except ConfigError as e:  # no model there, a broken config.json, a quantized checkpoint
        raise ConfigError(f"{stage}: {e}") from None


def check_data(data_dir, tokenizer: Tokenizer, model: GPT, seq_len: int, stage: str) -> None:
    """The shards must be the model's tokens, and the sequences must fit its context."""
    manifest = read_manifest(data_dir)
    made_by = manifest.get("tokenizer_fingerprint")
    if made_by and made_by != tokenizer.fingerprint():
        raise ConfigError(
            f"{stage}: {data_dir} was tokenized with another tokenizer ({made_by}) than the "
            f"model's ({tokenizer.fingerprint()}); prepare the data with the model's tokenizer"
        )
    if manifest["vocab_size"] > model.cfg.vocab_size:
        raise ConfigError(
            f"{stage}: the data's vocabulary ({manifest['vocab_size']}) is larger than the "
            f"model's ({model.cfg.vocab_size})"
        )
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"{stage}.seq_len ({seq_len}) exceeds the model's context ({model.cfg.max_seq_len})"
        )


def byte_table(tokenizer: Tokenizer, vocab_size: int, device) -> torch.Tensor:
    """Bytes per token id, padded with zeros to the model's vocabulary (for bits per byte)."""
    table = torch.as_tensor(tokenizer.token_bytes(), dtype=torch.long, device=device)
    return F.pad(table, (0, max(0, vocab_size - len(table))))


def validate(model, cfg: PretrainConfig, data_dir, token_bytes: torch.Tensor) -> dict:
    """Validation loss and bits per byte per language, with the stage's seq_len and budget."""
    device = token_bytes.device
    return evaluate(
        model, data_dir, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, token_bytes, device
    )


def val_losses(val: dict) -> str:
    """'5.72 / 6.87' (languages in the order of `val`)."""
    return " / ".join(f"{r['loss']:.2f}" for r in val.values())


def next_token_loss(model, x, y) -> tuple[torch.Tensor, dict]:
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), {}


def count_nonzero(model) -> int:
    return sum(int((p != 0).sum()) for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- loop


def train(
    model: GPT,
    cfg: PretrainConfig,
    data_dir,
    out_dir,
    tokenizer_dir,
    loss_fn: LossFn = next_token_loss,
    after_step: Callable[[GPT], None] | None = None,
    desc: str = "train",
    dist_cfg: DistConfig | None = None,
    info: dist.DistInfo | None = None,
) -> dict:
    """Train `model` (already on its device) for cfg.max_steps on the packed training shards,
    resuming from out_dir/checkpoints; writes metrics.jsonl, loss.png and out_dir/model.
    Under torchrun (`info`, dist.strategy ddp) every rank calls this and reads its own slice of
    each global batch of batch_size * dp_size rows; rank 0 evaluates and writes.
    Returns step, interrupted, val (the last evaluation), params, train_seconds, tokens_per_s."""
    dist_cfg, info = dist_cfg or DistConfig(), info or dist.DistInfo()
    out_dir = Path(out_dir)
    if info.is_main:  # the stage started the run; distill's baseline has its own folder
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_run_dir(out_dir)
    dist.barrier(info)
    device = next(model.parameters()).device
    tokenizer = Tokenizer.load(tokenizer_dir)
    token_bytes = byte_table(tokenizer, model.cfg.vocab_size, device)
    train_model = dist.parallelize(model, dist_cfg, info, device)
    optimizer = make_optimizer(model, cfg, device)
    loader = PackedLoader(
        data_dir, cfg.seq_len, cfg.batch_size, cfg.seed, info.dp_rank, info.dp_size
    )
    ckpt_root = out_dir / "checkpoints"
    resumed = resume_latest(ckpt_root, model, optimizer, loader, cfg.resume, info)
    if cfg.compile and device.type == "cuda":
        train_model = torch.compile(train_model)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len  # this rank's
    val: dict = {}

    def train_step(step: int) -> dict:
        logged = {}
        for micro in range(cfg.grad_accum):
            x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
            # DDP averages gradients once per step, after the last micro-batch
            with dist.no_sync(train_model, micro < cfg.grad_accum - 1):
                with autocast(device):
                    loss, logs = loss_fn(train_model, x, y)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **logs}.items():
                logged[k] = logged.get(k, 0) + v.detach() / cfg.grad_accum
        grad_norm = dist.clip_grad_norm(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            with torch.no_grad():
                after_step(model)
        return logged | {"grad_norm": grad_norm, "tokens": tokens_per_step}

    def evaluate(step: int) -> dict:
        nonlocal val
        if not info.is_main:
            return {}
        val = validate(model, cfg, data_dir, token_bytes)
        return val_row(val)

    def save(step: int, loop_state: dict) -> None:
        save_step(
            ckpt_root, step, model, optimizer, loader.state_dict(), info, cfg.keep_last,
            tokenizer_dir, tokenizer.pad_id, extra={"log": loop_state},
        )  # fmt: skip

    model.train()
    done = fit(
        cfg, optimizer, train_step, evaluate, save,
        out_dir=out_dir, desc=desc, resumed=resumed, info=info, device=device,
    )  # fmt: skip
    summary = {
        "step": done["step"],
        "max_steps": cfg.max_steps,
        "interrupted": done["interrupted"],
        "params": num_params(model),
        "val": val,
        "train_seconds": done["train_seconds"],
        "peak_memory_mb": done["peak_memory_mb"],  # per rank
    }
    if "tokens_per_s" in done:
        summary["tokens_per_s"] = done["tokens_per_s"]
    if not done["interrupted"]:
        save_final(model, out_dir / "model", info, tokenizer_dir=tokenizer_dir,
                   pad_token_id=tokenizer.pad_id)  # fmt: skip
    if not done["interrupted"] and info.is_main:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png", title=f"{desc} loss")
    return summary
