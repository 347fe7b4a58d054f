"""The training loop the compression stages share: distillation trains a student, pruning
fine-tunes a pruned model to recover what it lost.

The one idea: a stage supplies only its loss, `loss_fn(model, x, y) -> (loss, logs)`, and a hook
run after every optimizer step (pruning re-applies its masks there). Everything else is
pretraining's, built from the same pieces: the packed loader's data order, AdamW and the
schedule, gradient accumulation and clipping, autocast, step checkpoints with exact resume
after Ctrl-C, metrics.jsonl and the loss plot, validation loss and bits per byte per language.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.config import ConfigError, PretrainConfig
from lmforge.data.loader import PackedLoader, read_manifest
from lmforge.io import atomic_dir
from lmforge.model.checkpoint import save_model
from lmforge.model.load import load
from lmforge.model.transformer import GPT, num_params
from lmforge.perf import pick_device
from lmforge.tokenizer import Tokenizer
from lmforge.train.metrics import MetricsLog, plot_losses, read_metrics
from lmforge.train.optim import lr_at, make_optimizer
from lmforge.train.pretrain import StopFlag, autocast, evaluate
from lmforge.train.state import (
    clean_run_dir,
    prune_checkpoints,
    resume_latest,
    save_checkpoint,
)

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]

# --------------------------------------------------------------------------- setup


def setup_device(cfg: PretrainConfig) -> torch.device:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return pick_device(cfg.device)


def load_float_model(model_dir, device, stage: str) -> GPT:
    """A float checkpoint, or a ConfigError saying why model_dir cannot be one."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{stage}: {model_dir} is not a model directory (no config.json in it)")
    try:
        return load(model_dir, device=device, trainable=True)[0]
    except ConfigError as e:  # a broken config.json, or a quantized checkpoint
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
) -> dict:
    """Train `model` (already on its device) for cfg.max_steps on the packed training shards,
    resuming from out_dir/checkpoints; writes metrics.jsonl, loss.png and out_dir/model.
    Returns step, interrupted, val (the last evaluation), params, train_seconds, tokens_per_s."""
    # --- setup
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_run_dir(out_dir)  # the stage started the run; distill's baseline has its own folder
    device = next(model.parameters()).device
    tokenizer = Tokenizer.load(tokenizer_dir)
    token_bytes = byte_table(tokenizer, model.cfg.vocab_size, device)
    optimizer = make_optimizer(model, cfg, device)
    loader = PackedLoader(data_dir, cfg.seq_len, cfg.batch_size, cfg.seed)
    ckpt_root = out_dir / "checkpoints"
    resumed = resume_latest(ckpt_root, model, optimizer, loader, cfg.resume)
    step = resumed.get("step", 0)
    train_model = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=step or None)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len

    def save(at_step: int) -> None:
        # the sums since the last metrics line: a resumed run logs what an uninterrupted one does
        log = {
            "sums": {k: v.item() for k, v in sums.items()},
            "steps": at_step - step_last,
            "seconds": time.perf_counter() - t_last,
        }
        save_checkpoint(
            ckpt_root / f"step_{at_step:06d}",
            model,
            optimizer,
            at_step,
            loader.state_dict(),
            tokenizer_dir,
            extra={"log": log},
            pad_token_id=tokenizer.pad_id,
        )
        prune_checkpoints(ckpt_root, cfg.keep_last)

    def run_eval(at_step: int, write: bool = True) -> dict:
        res = validate(model, cfg, data_dir, token_bytes)
        if write:
            row = {
                f"val_{lang}_{k}": v
                for lang, r in res.items()
                for k, v in r.items()
                if k != "tokens"
            }
            metrics.write(step=at_step, **row)
        bar.write(
            f"{desc} step {at_step}: "
            + ", ".join(
                f"val {lang} loss {r['loss']:.3f} bpb {r['bpb']:.3f}" for lang, r in res.items()
            ),
            file=sys.stderr,
        )
        return res

    # --- loop
    model.train()
    last_eval: dict = {}
    interrupted = False
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    log = resumed.get("log", {})  # the sums since the last metrics line, from the checkpoint
    t_last = time.perf_counter() - log.get("seconds", 0.0)
    step_last, train_time = step - log.get("steps", 0), 0.0
    # logged values summed on the device: no per-step sync
    sums = {k: torch.tensor(v, device=device) for k, v in log.get("sums", {}).items()}
    with StopFlag() as flag:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.grad_accum):
                x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
                with autocast(device):
                    loss, logs = loss_fn(train_model, x, y)
                (loss / cfg.grad_accum).backward()
                for k, v in {"loss": loss, **logs}.items():
                    sums[k] = sums.get(k, 0) + v.detach() / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip or float("inf")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                n = step - step_last
                logged = {k: v.item() / n for k, v in sums.items()}
                dt = time.perf_counter() - t_last
                train_time += dt
                tok_s = tokens_per_step * n / dt
                metrics.write(
                    step=step, **logged, lr=lr, grad_norm=grad_norm.item(), tokens_per_s=tok_s
                )
                bar.set_postfix(loss=f"{logged['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                sums = {}
                t_last, step_last = time.perf_counter(), step
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                last_eval = run_eval(step)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            saved = (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps
            if saved:
                save(step)
                t_last = time.perf_counter()
            if flag.stop and step < cfg.max_steps:
                if not saved:
                    save(step)
                interrupted = True
                break
    bar.close()
    if not last_eval and not interrupted:  # resumed at the last step: evaluate what was trained
        # (for the summary: the log has that row already, unless it was lost)
        last_eval = run_eval(step, write=not metrics.has(step, "val_"))

    # --- outputs
    summary = {
        "step": step,
        "max_steps": cfg.max_steps,
        "interrupted": interrupted,
        "params": num_params(model),
        "val": last_eval,
        "train_seconds": train_time,
    }
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "tokens_per_s" in r]
    if rows:
        summary["tokens_per_s"] = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
    if not interrupted:
        with atomic_dir(out_dir / "model") as tmp:
            save_model(model, tmp, tokenizer_dir, pad_token_id=tokenizer.pad_id)
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png", title=f"{desc} loss")
    return summary
