"""Pretraining driver (`lmforge pretrain`): next-token prediction on packed token shards.

The one idea: the step counter is the only clock. Data (the loader's position), the learning
rate and checkpoint names all derive from it, so stopping after any saved step and resuming
reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.config import ConfigError, DistConfig, ModelConfig, PretrainConfig, config_hash
from lmforge.data.loader import (
    PackedLoader,
    ReplayLoader,
    read_manifest,
    replay_rows,
    val_batches,
    val_languages,
)
from lmforge.io import read_json, write_json
from lmforge.model.checkpoint import load_config
from lmforge.model.load import load
from lmforge.model.transformer import GPT, flops_per_token, num_params
from lmforge.perf import matmul_flops, peak_memory_mb, pick_device
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist
from lmforge.train.dist_ckpt import resume_latest, save_final, save_step
from lmforge.train.metrics import MetricsLog, plot_losses, read_metrics, step_bar
from lmforge.train.optim import lr_at, make_optimizer
from lmforge.train.state import run_config, start_run


def autocast(device: torch.device):
    """bf16 autocast on CUDA; CPUs here have no fast bf16, so they stay fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model,
    data_dir,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    token_bytes: torch.Tensor,
    device,
) -> dict:
    """Validation loss (nats/token) and bits per byte for each language's held-out text.
    Bits per byte ignores BOS/EOS targets (they have no bytes), which makes it comparable
    across tokenizers; the loss averages over all targets."""
    was_training = model.training
    model.eval()
    out = {}
    for lang in val_languages(data_dir):
        nll_sum, n_tok, nll_bytes, n_bytes = 0.0, 0, 0.0, 0
        for x, y in val_batches(data_dir, lang, seq_len, batch_size, max_tokens):
            x, y = x.to(device), y.to(device)
            with autocast(device):
                logits = model(x)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            nb = token_bytes[y.flatten()]
            nll_sum += nll.sum().item()
            n_tok += y.numel()
            nll_bytes += (nll * (nb > 0)).sum().item()
            n_bytes += nb.sum().item()
        if n_tok:
            out[lang] = {
                "loss": nll_sum / n_tok,
                "bpb": nll_bytes / (math.log(2) * max(n_bytes, 1)),
                "tokens": n_tok,
            }
    model.train(was_training)
    return out


def _eval_line(step: int, res: dict) -> str:
    return f"step {step}: " + ", ".join(
        f"val {lang} loss {r['loss']:.3f} bpb {r['bpb']:.3f}" for lang, r in res.items()
    )


class StopFlag:
    """First Ctrl-C asks the loop to save and stop after the current step; a second one aborts."""

    def __init__(self):
        self.stop = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True
            tqdm.write(
                "interrupt: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)",
                file=sys.stderr,
            )

        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            self._old = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _fault(info) -> int:
    """LMFORGE_FAIL_AT=RANK:STEP makes that rank raise before that step: the tests' way to check
    that one failing rank stops every rank, with the error reported and no hang."""
    spec = os.environ.get("LMFORGE_FAIL_AT", "")
    rank, _, step = spec.partition(":")
    return int(step) if spec and int(rank) == info.rank else -1


def init_model_config(init_dir: Path, recipe_cfg: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """The architecture of the model to continue from, and the recipe's `model:` settings it
    overrides ("dim 32 -> 576"): those the recipe sets (differs from the defaults) that init_dir
    does not share."""
    if not (init_dir / "config.json").is_file():
        raise ConfigError(
            f"pretrain.init_from: {init_dir} is not a model directory (no config.json in it)"
        )
    cfg = load_config(init_dir)
    default = ModelConfig()
    ignored = [
        f"{f.name} {getattr(recipe_cfg, f.name)} -> {getattr(cfg, f.name)}"
        for f in dataclasses.fields(ModelConfig)
        if getattr(recipe_cfg, f.name) not in (getattr(default, f.name), getattr(cfg, f.name))
    ]
    return cfg, ignored


def check_tokens(data_dir: Path, manifest: dict, tokenizer: Tokenizer, tokenizer_dir, vocab: int):
    """The shards must hold this tokenizer's ids: a model reads another tokenizer's ids as
    unrelated tokens, and trains without an error on noise."""
    made_by, ours = manifest.get("tokenizer_fingerprint"), tokenizer.fingerprint()
    if (made_by and made_by != ours) or manifest["vocab_size"] != tokenizer.vocab_size:
        theirs = manifest.get("tokenizer", "an unrecorded tokenizer")
        raise ConfigError(
            f"{data_dir} was prepared with another tokenizer than the model's: {theirs} "
            f"(vocabulary {manifest['vocab_size']:,}, fingerprint {made_by or '?'}) against "
            f"{tokenizer_dir} (vocabulary {tokenizer.vocab_size:,}, fingerprint {ours}); "
            f"prepare it again with `lmforge prepare --tokenizer-dir {tokenizer_dir}`"
        )
    if manifest["vocab_size"] > vocab:
        raise ConfigError(
            f"{data_dir}: the data's vocabulary ({manifest['vocab_size']:,}) is larger than the "
            f"model's ({vocab:,})"
        )


@torch.no_grad()
def load_sharded(model: GPT, source: GPT, device: torch.device, tp: int) -> None:
    """dist.materialize's twin for init_from: allocate the parallelized meta model and give each
    rank its slices of the loaded model's tensors instead of fresh random ones."""
    model.to_empty(device=device)
    if model.cfg.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight:
        model.lm_head.weight = model.tok_emb.weight  # to_empty untied plain tensors (not DTensors)
    full = dict(source.named_parameters())
    for name, p in model.named_parameters():
        index = dist.relayout_index(model.cfg, name, 1, tp)
        dist.assign(p, full[name] if index is None else full[name][index])
    model.reset_buffers()


def prepare_model_config(model_cfg: ModelConfig, manifest: dict) -> ModelConfig:
    """Fill vocabulary size and special ids from the prepared data; refuse a mismatch."""
    vocab = manifest["vocab_size"]
    if model_cfg.vocab_size and model_cfg.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's ({vocab})"
        )
    return dataclasses.replace(
        model_cfg,
        vocab_size=model_cfg.vocab_size or vocab,
        bos_token_id=manifest["bos_id"],
        eos_token_id=manifest["eos_id"],
    )


def run(
    cfg: PretrainConfig,
    model_cfg: ModelConfig,
    data_dir,
    tokenizer_dir,
    out_dir,
    dist_cfg: DistConfig | None = None,
) -> dict:
    """Train, evaluate, checkpoint. Returns a summary (also written to out_dir/summary.json).
    Under torchrun (dist.strategy ddp or fsdp, dist.tp) every rank calls this; rank 0 writes
    the files. With cfg.init_from, the model (architecture, weights, tokenizer) comes from that
    directory and tokenizer_dir may be None."""
    args = (cfg, model_cfg, Path(data_dir), tokenizer_dir, Path(out_dir))
    return dist.launch(dist_cfg, _train, *args)


def _train(cfg, model_cfg, data_dir: Path, tokenizer_dir, out_dir: Path, dist_cfg, info) -> dict:
    # --- setup
    device = dist.device_for(info, pick_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    manifest = read_json(data_dir / "manifest.json", "data manifest (run `lmforge prepare` first)")
    init_dir = Path(cfg.init_from).expanduser() if cfg.init_from else None
    if init_dir:
        # continued pretraining: the model's own architecture and tokenizer, not the recipe's
        model_cfg, ignored = init_model_config(init_dir, model_cfg)
        if ignored and info.is_main:
            print(
                f"pretrain.init_from: the model is {init_dir}; the recipe's model settings are "
                f"ignored ({', '.join(ignored)})",
                file=sys.stderr,
            )
        if tokenizer_dir is not None and (
            Tokenizer.load(tokenizer_dir).fingerprint() != Tokenizer.load(init_dir).fingerprint()
        ):
            raise ConfigError(
                f"pretrain.init_from: the tokenizer in {tokenizer_dir} is not the model's "
                f"({init_dir}); leave the tokenizer directory out to use the model's"
            )
        tokenizer_dir = init_dir
    else:
        model_cfg = prepare_model_config(model_cfg, manifest)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"pretrain.seq_len ({cfg.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len})"
        )
    tokenizer = Tokenizer.load(tokenizer_dir)
    check_tokens(data_dir, manifest, tokenizer, tokenizer_dir, model_cfg.vocab_size)
    replay_dir = Path(cfg.replay).expanduser() if cfg.replay_fraction > 0 else None
    n_replay = replay_rows(cfg.batch_size, cfg.replay_fraction)
    if replay_dir:
        replay_manifest = read_manifest(replay_dir)
        check_tokens(replay_dir, replay_manifest, tokenizer, tokenizer_dir, model_cfg.vocab_size)
    config = run_config(
        cfg, model_cfg, dp_size=info.dp_size, init_from=init_dir, replay_dir=replay_dir
    )
    # the data by content (its manifest names the tokenizer too): prepared again, it is new data
    config["data"] = config_hash(manifest)
    if replay_dir:
        config["replay_data"] = config_hash(replay_manifest)
    start_run(out_dir, "pretrain", config, cfg.resume, cfg.overwrite, info)
    token_bytes = torch.as_tensor(tokenizer.token_bytes(), dtype=torch.long, device=device)
    if len(token_bytes) < model_cfg.vocab_size:  # padded vocabulary: extra ids have no bytes
        token_bytes = F.pad(token_bytes, (0, model_cfg.vocab_size - len(token_bytes)))

    torch.manual_seed(cfg.seed)
    if info.sharded:  # built empty, sharded, then each rank fills only its own slices
        with torch.device("meta"):
            model = GPT(model_cfg)
    elif init_dir:
        model = load(init_dir, device=device, trainable=True)[0].train()
    else:
        model = GPT(model_cfg).to(device)
    n_params = num_params(model)
    # FSDP2 and tensor parallelism turn the parameters into DTensors: the optimizer comes after
    train_model = dist.parallelize(model, dist_cfg, info, device)
    if info.sharded and init_dir:
        load_sharded(model, load(init_dir, trainable=True)[0], device, info.tp)
    elif info.sharded:
        dist.materialize(model, device, info.tp)
    # a fresh optimizer even with init_from: the schedule starts at step 0, so the learning rate
    # warms up again from 0 (a cold Adam at full lr would wreck the loaded weights)
    optimizer = make_optimizer(model, cfg, device)
    # each data-parallel rank reads its own slice of every global batch (batch_size * dp_size)
    loader = PackedLoader(
        data_dir, cfg.seq_len, cfg.batch_size - n_replay, cfg.seed, info.dp_rank, info.dp_size
    )
    if replay_dir:  # its own order (seed + 1): the two folders are shuffled independently
        replay = PackedLoader(
            replay_dir, cfg.seq_len, n_replay, cfg.seed + 1, info.dp_rank, info.dp_size
        )
        loader = ReplayLoader(loader, replay)
    ckpt_root = out_dir / "checkpoints"
    resumed = resume_latest(ckpt_root, model, optimizer, loader, cfg.resume, info)
    step = resumed.get("step", 0)
    if cfg.compile and device.type == "cuda":
        train_model = torch.compile(train_model)
    metrics = (
        MetricsLog(out_dir / "metrics.jsonl", resume_step=step or None) if info.is_main else None
    )

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * info.dp_size
    flops_step = flops_per_token(model_cfg, cfg.seq_len) * tokens_per_step
    peak = matmul_flops(device)
    write_json(out_dir / "model_config.json", dataclasses.asdict(model_cfg))

    def save(at_step: int) -> None:
        # what the next metrics line sums since the last one: a resumed run then logs the very
        # numbers an uninterrupted one does, whether or not save_every is a multiple of log_every
        log = {
            "loss_sum": dist.mean(loss_acc, info).item(),
            "steps": at_step - step_last,
            "seconds": time.perf_counter() - t_last,
        }
        save_step(
            ckpt_root, at_step, model, optimizer, loader.state_dict(), info, cfg.keep_last,
            tokenizer_dir, tokenizer.pad_id, extra={"log": log},
        )  # fmt: skip

    def run_eval(at_step: int, write: bool = True) -> dict:
        res = {}
        if info.is_main or info.sharded:  # a sharded model needs every rank in each forward
            args = (cfg.seq_len, cfg.batch_size, cfg.eval_tokens, token_bytes, device)
            res = evaluate(model, data_dir, *args)
            if replay_dir:  # what replay is there to keep: the general text's held-out loss
                res |= {f"replay_{k}": v for k, v in evaluate(model, replay_dir, *args).items()}
        if info.is_main and write:
            row = {
                f"val_{lang}_{k}": v
                for lang, r in res.items()
                for k, v in r.items()
                if k != "tokens"
            }
            metrics.write(step=at_step, **row)
        dist.barrier(info)
        return res

    # --- loop
    start_eval: dict = {}
    if init_dir and step == 0:  # where continued pretraining starts: the loaded model's scores
        start_eval = run_eval(0)
        if info.is_main:
            tqdm.write(_eval_line(0, start_eval), file=sys.stderr)
    model.train()
    last_eval: dict = {}
    evaluated = False  # the same on every rank (last_eval is only filled on rank 0)
    interrupted = False
    bar = step_bar("pretrain", cfg.max_steps, step, info.is_main)
    fail_at = _fault(info)
    log = resumed.get("log", {})  # the sums since the last metrics line, from the checkpoint
    t_last, step_last = time.perf_counter() - log.get("seconds", 0.0), step - log.get("steps", 0)
    train_time = 0.0
    loss_acc = torch.full((), log.get("loss_sum", 0.0), device=device)
    with StopFlag() as flag:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if step == fail_at:
                raise RuntimeError(f"rank {info.rank}: failing at step {step} (LMFORGE_FAIL_AT)")
            for micro in range(cfg.grad_accum):
                x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
                # DDP averages gradients once per step, after the last micro-batch
                with dist.no_sync(train_model, micro < cfg.grad_accum - 1):
                    with autocast(device):
                        logits = train_model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    (loss / cfg.grad_accum).backward()
                loss_acc += loss.detach() / cfg.grad_accum
            grad_norm = dist.clip_grad_norm(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                # the only host sync in the loop (and, with several ranks, one all-reduce)
                loss_val = dist.mean(loss_acc, info).item() / (step - step_last)
                dt = time.perf_counter() - t_last
                train_time += dt
                tok_s = tokens_per_step * (step - step_last) / dt
                mfu = flops_step * (step - step_last) / dt / peak
                if metrics:
                    metrics.write(
                        step=step,
                        loss=loss_val,
                        lr=lr,
                        grad_norm=grad_norm.item(),
                        tokens_per_s=tok_s,
                        mfu=mfu,
                        tokens=step * tokens_per_step,
                    )
                bar.set_postfix(
                    loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.0f}%"
                )
                loss_acc.zero_()
                t_last, step_last = time.perf_counter(), step
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                last_eval, evaluated = run_eval(step), True
                if info.is_main:
                    bar.write(_eval_line(step, last_eval), file=sys.stderr)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                save(step)
                t_last = time.perf_counter()
            if dist.any_rank(flag.stop, info, device) and step < cfg.max_steps:
                save(step)
                interrupted = True
                break
    bar.close()
    if not evaluated and not interrupted:  # resumed at the last step: evaluate what was trained
        # (for the summary: the log has that row already, unless it was lost)
        last_eval = run_eval(step, write=not (metrics and metrics.has(step, "val_")))
    peak_mb = dist.gather(round(peak_memory_mb(device), 1), info)  # before the final export
    if not interrupted:
        save_final(
            model,
            out_dir / "model",
            info,
            tokenizer_dir=tokenizer_dir,
            pad_token_id=tokenizer.pad_id,
        )
    if not info.is_main:
        return {"step": step, "interrupted": interrupted, "rank": info.rank}

    # --- outputs
    summary = {
        "step": step,
        "max_steps": cfg.max_steps,
        "interrupted": interrupted,
        "params": n_params,
        "tokens_per_step": tokens_per_step,
        "device": str(device),
        "world_size": info.world_size,
        "strategy": info.strategy if info.enabled else "none",
        "tp": info.tp,
        "peak_memory_mb": peak_mb,  # per rank
        "peak_flops": peak,
        "train_seconds": train_time,
        "val": last_eval,
        "val_start": start_eval,  # init_from: the loaded model's, before the first step
        "model": dataclasses.asdict(model_cfg),
        "init_from": str(init_dir) if init_dir else None,
        "replay": {
            "data": str(replay_dir),
            "fraction": cfg.replay_fraction,
            "rows_per_batch": n_replay,
            "batch_size": cfg.batch_size,
        }
        if replay_dir
        else None,
    }
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "tokens_per_s" in r]
    if rows:
        # the peak is measured again now: a busy machine at start-up would understate it
        summary["peak_flops"] = peak = max(peak, matmul_flops(device))
        summary["tokens_per_s"] = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
        summary["mfu"] = summary["tokens_per_s"] * flops_step / tokens_per_step / peak
    if not interrupted:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png", title="pretraining loss")
    write_json(out_dir / "summary.json", summary)
    return summary
