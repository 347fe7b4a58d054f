"""Pretraining driver (`lmforge pretrain`): next-token prediction on packed token shards.

The one idea: a step is micro-batches of the packed loader, cross-entropy, one optimizer step,
run by the training clock (`train/loop.py`). Data (the loader's position), the learning rate
and checkpoint names all derive from the step, so stopping after any saved step and resuming
reproduces the uninterrupted run exactly; under torchrun the same step runs with DDP, FSDP2 or
tensor parallelism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.config import (
    ConfigError,
    DistConfig,
    ModelConfig,
    PretrainConfig,
    config_hash,
    model_family,
)
from lmforge.data.loader import (
    PackedLoader,
    ReplayLoader,
    read_manifest,
    replay_rows,
)
from lmforge.io import atomic_dir, read_json, write_json
from lmforge.model import mamba
from lmforge.model.checkpoint import load_config, save_extras
from lmforge.model.load import load
from lmforge.model.transformer import GPT, aux_loss, aux_metrics, flops_per_token, num_params
from lmforge.perf import autocast, matmul_flops, pick_device
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist, mlm, span
from lmforge.train.checkpoint import resume_latest, save_final, save_step
from lmforge.train.heldout import evaluate, val_row
from lmforge.train.loop import fit
from lmforge.train.metrics import plot_losses
from lmforge.train.optim import make_optimizer
from lmforge.train.run_dir import run_config, start_run


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
    directory and tokenizer_dir may be None. The model family picks the objective (TRAINERS)."""
    args = (cfg, model_cfg, Path(data_dir), tokenizer_dir, Path(out_dir))
    return dist.launch(dist_cfg, TRAINERS[model_family(model_cfg)], *args)


def _train_encoder(cfg, model_cfg, data_dir: Path, tokenizer_dir, out_dir: Path, _, info) -> dict:
    """Masked-LM pretraining of an encoder from scratch (train/mlm.py), on the same shards and
    with the same data checks as the decoder's; the decoder-only options are refused by name."""
    given = [k for k in ("init_from", "replay_fraction") if getattr(cfg, k)]
    if given:
        raise ConfigError(
            f"pretrain.{', pretrain.'.join(given)}: not supported for an encoder (model.arch "
            f"{model_cfg.arch}); masked-LM pretraining starts from scratch on one data folder"
        )
    if info.enabled:
        raise ConfigError("masked-LM pretraining runs in one process: torchrun is for decoders")
    manifest = read_json(data_dir / "manifest.json", "data manifest (run `lmforge prepare` first)")
    tokenizer = Tokenizer.load(tokenizer_dir)
    model_cfg, mask = mlm.encoder_vocab(model_cfg, tokenizer)
    check_tokens(data_dir, manifest, tokenizer, tokenizer_dir, model_cfg.vocab_size)
    return mlm.train(cfg, model_cfg, mask, data_dir, tokenizer, out_dir, manifest, info)


def _train_t5(cfg, model_cfg, data_dir: Path, tokenizer_dir, out_dir: Path, _, info) -> dict:
    """Span-corruption pretraining of a T5 from scratch (train/span.py), on the same shards and
    with the same data checks as the decoder's; one process."""
    span.refuse_unsupported(cfg)
    if info.enabled:
        raise ConfigError("model.arch t5 pretrains in one process, not torchrun")
    manifest = read_json(data_dir / "manifest.json", "data manifest (run `lmforge prepare` first)")
    tokenizer = Tokenizer.load(tokenizer_dir)
    vocab = span.t5_config(model_cfg, tokenizer, span.sentinels(tokenizer)).vocab_size
    check_tokens(data_dir, manifest, tokenizer, tokenizer_dir, vocab)
    return span.train(cfg, model_cfg, data_dir, tokenizer, out_dir, manifest, info)


@dataclasses.dataclass(frozen=True)
class DecoderClass:
    """What the next-token driver needs of a model class other than GPT: how to build it from
    the `model:` section, write and read its weights, and count its FLOPs."""

    build: Callable  # ModelConfig -> the model
    write: Callable  # (model, dir, tokenizer_dir, pad_token_id) -> None: a whole HF directory
    read: Callable  # (model, dir) -> None: weights in place (resume)
    flops_per_token: Callable  # (ModelConfig, seq_len) -> training FLOPs per token


def _mamba_config(c: ModelConfig) -> mamba.MambaConfig:
    return mamba.MambaConfig(
        vocab_size=c.vocab_size, dim=c.dim, n_layer=c.n_layer, norm_eps=c.norm_eps,
        tie_embeddings=c.tie_embeddings, init_std=c.init_std, max_seq_len=c.max_seq_len,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )  # fmt: skip


def _write_mamba(model, out: Path, tokenizer_dir, pad_token_id) -> None:
    model.cfg.pad_token_id = pad_token_id or 0
    mamba.save_mamba(model, out)
    save_extras(model.cfg, out, tokenizer_dir, pad_token_id)  # generation config, tokenizer


MAMBA = DecoderClass(
    build=lambda c: mamba.Mamba(_mamba_config(c)),
    write=_write_mamba,
    read=lambda model, d: mamba.read_weights(model, load_file(str(d / "model.safetensors")), d),
    flops_per_token=lambda c, _: mamba.flops_per_token(_mamba_config(c)),
)


def _train_ssm(cfg, model_cfg, data_dir: Path, tokenizer_dir, out_dir: Path, dist_cfg, info):
    """A state-space decoder (model.arch mamba): the decoder's next-token step, data, checks,
    clock and outputs, with its own model class (saved as MambaForCausalLM); one process, from
    scratch (continued pretraining and torchrun are the GPT's)."""
    if cfg.init_from:
        raise ConfigError(
            f"pretrain.init_from: not supported for model.arch {model_cfg.arch} (it trains from "
            "scratch)"
        )
    if info.enabled:
        raise ConfigError(f"model.arch {model_cfg.arch} pretrains in one process, not torchrun")
    return _train(cfg, model_cfg, data_dir, tokenizer_dir, out_dir, dist_cfg, info, MAMBA)


def _train(
    cfg, model_cfg, data_dir: Path, tokenizer_dir, out_dir: Path, dist_cfg, info, other=None
) -> dict:
    """Next-token pretraining of a GPT, or of the DecoderClass `other` (one process)."""
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
        model = (other.build if other else GPT)(model_cfg).to(device)
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
    read = (lambda d: other.read(model, d)) if other else None
    resumed = resume_latest(ckpt_root, model, optimizer, loader, cfg.resume, info, read)
    if cfg.compile and device.type == "cuda":
        train_model = torch.compile(train_model)
    pipe = None
    if info.pp > 1:  # this rank's stage, run by PyTorch's pipeline schedule
        from lmforge.train.pipeline import Pipeline

        pipe = Pipeline(model, dist_cfg, info, device, cfg.batch_size, cfg.grad_accum)
        pipe.release(optimizer)  # a resumed checkpoint holds every stage's moments
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * info.dp_size
    flops_tok = (other.flops_per_token if other else flops_per_token)(model_cfg, cfg.seq_len)
    write_json(out_dir / "model_config.json", dataclasses.asdict(model_cfg))
    evals: dict[int, dict] = {}  # step -> {lang: {loss, bpb, tokens}} (rank 0)

    def pipeline_step(step: int) -> dict:
        loss_sum = torch.zeros((), device=device)
        for _ in range(cfg.grad_accum):  # every stage reads the batch: the first x, the last y
            x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
            loss_sum += pipe.forward_backward(x, y)
        pipe.reduce_grads()
        grad_norm = pipe.clip(cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum, "grad_norm": grad_norm, "tokens": tokens_per_step // info.dp_size}

    def train_step(step: int) -> dict:
        if pipe:
            return pipeline_step(step)
        loss_sum = torch.zeros((), device=device)
        extras: dict[str, torch.Tensor] = {}  # the modules' own numbers (a mixture of experts')
        for micro in range(cfg.grad_accum):
            x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
            # DDP averages gradients once per step, after the last micro-batch
            with dist.no_sync(train_model, micro < cfg.grad_accum - 1):
                with autocast(device):
                    logits = train_model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                # objectives the modules add themselves (load balancing); "loss" stays the
                # cross-entropy, comparable across models
                aux = aux_loss(model)
                ((loss if aux is None else loss + aux) / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
            for k, v in aux_metrics(model).items():
                extras[k] = extras.get(k, 0) + v / cfg.grad_accum
        grad_norm = dist.clip_grad_norm(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = tokens_per_step // info.dp_size
        return {"loss": loss_sum, "grad_norm": grad_norm, "tokens": tokens} | extras

    def run_eval(step: int) -> dict:
        res = {}
        # a pipeline rank holds only its own stage up to date: the whole model first
        with pipe.whole(optimizer) if pipe else contextlib.nullcontext():
            if info.is_main or info.sharded:  # a sharded model needs every rank in each forward
                args = (cfg.seq_len, cfg.batch_size, cfg.eval_tokens, token_bytes, device)
                res = evaluate(model, data_dir, *args)
                if replay_dir:  # what replay is there to keep: the general text's held-out loss
                    res |= {f"replay_{k}": v for k, v in evaluate(model, replay_dir, *args).items()}
        if not info.is_main:
            return {}
        evals[step] = res
        return val_row(res)

    def write(d: Path) -> None:
        other.write(model, d, tokenizer_dir, tokenizer.pad_id)

    def save(step: int, loop_state: dict) -> None:
        # a pipeline saves one process's whole checkpoint: it resumes under any layout
        with pipe.whole(optimizer) if pipe else contextlib.nullcontext():
            save_step(
                ckpt_root, step, model, optimizer, loader.state_dict(), info, cfg.keep_last,
                tokenizer_dir, tokenizer.pad_id, extra={"log": loop_state},
                write_weights=write if other else None,
            )  # fmt: skip

    model.train()
    done = fit(
        cfg, optimizer, train_step, run_eval, save, out_dir=out_dir, desc="pretrain",
        resumed=resumed, info=info, device=device,
        eval_at_start=bool(init_dir),  # continued pretraining: the loaded model's scores first
        flops_per_token=flops_tok,
    )  # fmt: skip
    step, interrupted = done["step"], done["interrupted"]
    if pipe:
        pipe.sync(optimizer)
    if not interrupted and other:
        with atomic_dir(out_dir / "model") as tmp:
            write(tmp)
    elif not interrupted:
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
        "pp": info.pp,
        "peak_memory_mb": done["peak_memory_mb"],  # per rank, before the final export
        "peak_flops": matmul_flops(device),
        "train_seconds": done["train_seconds"],
        "val": evals[max(evals)] if evals else {},
        "val_start": evals.get(0, {}) if init_dir else {},  # the loaded model's, before step 1
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
    if "tokens_per_s" in done:
        summary["tokens_per_s"] = done["tokens_per_s"]
        summary["mfu"] = done["tokens_per_s"] * flops_tok / summary["peak_flops"]
    if not interrupted:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png", title="pretraining loss")
    write_json(out_dir / "summary.json", summary)
    return summary


# model family -> its pretraining driver: next-token prediction for decoders (GPT, or Mamba's
# own class through the same driver), masked-LM for encoders (all on fit, the one clock)
TRAINERS = {
    "decoder": _train,
    "encoder": _train_encoder,
    "ssm": _train_ssm,
    "seq2seq": _train_t5,
}
