"""Supervised fine-tuning (`lmforge sft`): teach a base model the chat format on instruction data.

The one idea: a conversation is rendered with the tokenizer's chat template and the loss is
taken only on the assistant's replies (their text and end-of-turn marker). Prompts, system
messages and padding are context, never targets: the model learns to answer, not to imitate
users. Conversations are padded to the longest in their batch (right padding, so a causal
model never attends from a real token to a pad), and the batch order is a pure function of
the step, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.config import (
    ConfigError,
    DistConfig,
    LoRAConfig,
    SFTConfig,
    SFTSourceConfig,
    resolve_path,
)
from lmforge.data.batches import BatchPlan
from lmforge.data.readers import DataError, is_val, read_jsonl
from lmforge.io import atomic_dir, read_json, write_json
from lmforge.model.load import load
from lmforge.model.lora import apply_lora, load_adapter_weights, save_adapter
from lmforge.model.transformer import flops_per_token, num_params
from lmforge.perf import autocast, pick_device
from lmforge.tokenizer import ROLES, Tokenizer
from lmforge.train import dist
from lmforge.train.checkpoint import resume_latest, save_final, save_step
from lmforge.train.loop import fit
from lmforge.train.metrics import plot_losses
from lmforge.train.optim import make_optimizer
from lmforge.train.run_dir import run_config, start_run

IGNORE = -100  # label of a position that is not a target (F.cross_entropy's ignore_index)

# --------------------------------------------------------------------------- rows


def row_to_messages(row, system_prompt: str = "") -> list[dict]:
    """One JSONL row -> a conversation. Either Alpaca-style `instruction` (+ optional `input`)
    and `output`, or an OpenAI-style `messages` list. Raises ValueError naming the bad field."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] must be an object")
            if m.get("role") not in ROLES:
                raise ValueError(
                    f"messages[{i}].role must be one of {ROLES}, got {m.get('role')!r}"
                )
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
            if m["role"] == "assistant" and not m["content"].strip():
                raise ValueError(f"messages[{i}] is an empty assistant turn")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("'messages' has no assistant turn to learn from")
    elif "instruction" in row or "output" in row:
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"field {key!r} must be a string")
        extra = row.get("input", "")
        if not isinstance(extra, str):
            raise ValueError("field 'input' must be a string")
        if not row["output"].strip():
            raise ValueError("field 'output' is empty (an empty assistant turn)")
        user = row["instruction"] + ("\n\n" + extra if extra.strip() else "")
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": row["output"]},
        ]
    else:
        raise ValueError("a row needs 'messages', or 'instruction' and 'output'")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def read_source(
    src: SFTSourceConfig, base_dir: str, system_prompt: str, skip_bad_rows: bool
) -> tuple[list[list[dict]], list[str]]:
    """(conversations, problems) of one JSONL file. A bad row is a DataError naming file and
    line, unless skip_bad_rows, which lists it in problems and goes on."""
    path = resolve_path(src.path, base_dir)
    if not path.is_file():
        raise DataError(f"sft source {src.name!r}: file not found: {path}")
    conversations, problems = read_jsonl(
        path, lambda row: row_to_messages(row, system_prompt), skip_bad_rows, src.max_rows
    )
    if not conversations:
        raise DataError(f"sft source {src.name!r}: {path} has no usable rows")
    return conversations, problems


# --------------------------------------------------------------------------- tokens and labels


def encode_example(
    tokenizer: Tokenizer, messages: list[dict], seq_len: int, overflow: str
) -> tuple[np.ndarray | None, str]:
    """(example, status). The example is (2, n) int64 with n <= seq_len: row 0 the input ids
    (BOS first where the tokenizer uses one), row 1 the labels (the next token where it belongs to an assistant reply, else
    IGNORE). Status is "ok", "truncated", or "dropped" (example None): too long with
    overflow="drop", or no reply token left after truncation."""
    ids = tokenizer.chat_prefix(messages)
    reply = [False] * len(ids)
    for piece, is_reply in tokenizer.encode_chat_segments(messages):
        ids += piece
        reply += [is_reply] * len(piece)
    status = "ok"
    if len(ids) > seq_len + 1:
        if overflow == "drop":
            return None, "dropped"
        ids, reply, status = ids[: seq_len + 1], reply[: seq_len + 1], "truncated"
    ids_arr = np.asarray(ids, dtype=np.int64)
    labels = np.where(np.asarray(reply[1:]), ids_arr[1:], IGNORE)
    if not (labels != IGNORE).any():
        return None, "dropped"
    return np.stack([ids_arr[:-1], labels]), status


def pad_batch(examples: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: x (B, T) with pad_id, y (B, T) with IGNORE."""
    T = max(e.shape[1] for e in examples)
    x = np.full((len(examples), T), pad_id, dtype=np.int64)
    y = np.full((len(examples), T), IGNORE, dtype=np.int64)
    for i, e in enumerate(examples):
        x[i, : e.shape[1]], y[i, : e.shape[1]] = e
    return torch.from_numpy(x), torch.from_numpy(y)


def masked_nll(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over target positions and how many there are."""
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return nll, int((y != IGNORE).sum())


# --------------------------------------------------------------------------- data


def build_examples(cfg: SFTConfig, tokenizer: Tokenizer, base_dir: str) -> tuple[list, list, dict]:
    """Train and validation examples of every source, and their counts for the report."""
    if not cfg.sources:
        raise ConfigError("sft.sources is empty: name at least one JSONL file of instruction data")
    rng = np.random.default_rng(cfg.seed)
    train, val, stats = [], [], {"sources": {}, "problems": [], "val_sources": []}
    for src in cfg.sources:
        convs, problems = read_source(src, base_dir, cfg.system_prompt, cfg.skip_bad_rows)
        stats["problems"] += problems
        s = {"rows": len(convs), "bad_rows": len(problems), "dropped": 0, "truncated": 0}
        s.update({"train": 0, "val": 0, "train_tokens": 0, "reply_tokens": 0})
        src_train = []
        for conv in convs:
            ex, status = encode_example(tokenizer, conv, cfg.seq_len, cfg.overflow)
            if ex is None:
                s["dropped"] += 1
                continue
            s["truncated"] += status == "truncated"
            if is_val(json.dumps(conv, ensure_ascii=False), cfg.val_fraction):
                val.append(ex)
                stats["val_sources"].append(src.name)
                s["val"] += 1
            else:
                src_train.append(ex)
        # weight = epochs of this source: whole copies, then a seeded sample for the fraction
        whole, frac = divmod(src.weight, 1.0)
        picked = src_train * int(whole)
        picked += [
            src_train[i] for i in rng.permutation(len(src_train))[: round(frac * len(src_train))]
        ]
        train += picked
        s["train"] = len(picked)
        s["train_tokens"] = int(sum(e.shape[1] for e in picked))
        s["reply_tokens"] = int(sum((e[1] != IGNORE).sum() for e in picked))
        stats["sources"][src.name] = s
    if not train:
        raise ConfigError("sft: no training examples left (all dropped, held out or weight 0)")
    return train, val, stats


@torch.no_grad()
def evaluate(model, examples: list, batch_size: int, pad_id: int, device) -> float:
    """Mean loss per reply token over the held-out conversations (nan when there are none)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = pad_batch(examples[i : i + batch_size], pad_id)
        with autocast(device):
            logits = model(x.to(device))
        nll, n = masked_nll(logits, y.to(device))
        total, count = total + nll.item(), count + n
    model.train(was_training)
    return total / count if count else math.nan


def loss_by_source(model, val: list, names: list[str], batch_size: int, pad_id: int, device):
    """Held-out reply loss of each source (its language, usually) on its own."""
    return {
        name: evaluate(
            model, [e for e, n in zip(val, names) if n == name], batch_size, pad_id, device
        )
        for name in dict.fromkeys(names)
    }


# --------------------------------------------------------------------------- driver


def run(
    cfg: SFTConfig,
    lora_cfg: LoRAConfig,
    model_dir,
    out_dir,
    base_dir: str = ".",
    dist_cfg: DistConfig | None = None,
) -> dict:
    """Fine-tune the model in model_dir; writes out_dir/model (or out_dir/adapter with LoRA),
    metrics.jsonl, loss.png and summary.json. Returns the summary. Under torchrun every rank
    calls this (dist.strategy ddp, or fsdp without LoRA); rank 0 writes the files."""
    return dist.launch(dist_cfg, _train, cfg, lora_cfg, Path(model_dir), Path(out_dir), base_dir)


def _train(cfg, lora_cfg, model_dir: Path, out_dir: Path, base_dir, dist_cfg, info) -> dict:
    # --- setup
    dist.data_parallel_only(info, "sft", bool(lora_cfg.r))
    # the adapters trained are lora_cfg: recorded inside the sft section, where a recipe gives them
    config = run_config(
        dataclasses.replace(cfg, lora=lora_cfg), dp_size=info.dp_size, model_dir=model_dir
    )
    start_run(out_dir, "sft", config, cfg.resume, cfg.overwrite, info)
    device = dist.device_for(info, pick_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = Tokenizer.load(model_dir)
    model = load(model_dir, device=device, trainable=True)[0]
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"sft.seq_len ({cfg.seq_len}) exceeds the model's context ({model.cfg.max_seq_len})"
        )
    train, val, stats = build_examples(cfg, tokenizer, base_dir)
    for p in stats["problems"][:5] if info.is_main else []:
        tqdm.write(f"skipped {p}", file=sys.stderr)

    torch.manual_seed(cfg.seed)
    use_lora = bool(lora_cfg.r)
    if use_lora:
        apply_lora(model, lora_cfg, seed=cfg.seed)
    n_params = num_params(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_model = dist.parallelize(model, dist_cfg, info, device)  # FSDP2 shards `model` in place
    optimizer = make_optimizer(model, cfg, device)
    ckpt_root = out_dir / "checkpoints"
    write_weights = (lambda d: save_adapter(model, d, str(model_dir))) if use_lora else None
    read_weights = (lambda d: load_adapter_weights(model, d)) if use_lora else None
    resumed = resume_latest(ckpt_root, model, optimizer, None, cfg.resume, info, read_weights)
    if cfg.compile and device.type == "cuda":
        train_model = torch.compile(train_model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def per_source() -> dict:
        if not val or not (info.is_main or info.sharded):
            return {}
        names = stats["val_sources"]
        return loss_by_source(model, val, names, cfg.batch_size, tokenizer.pad_id, device)

    # the base model's held-out reply loss per source, for the before/after table; kept on
    # disk so that a resumed run still reports it
    before_file = out_dir / "val_before.json"
    before = read_json(before_file, "held-out loss before SFT") if before_file.is_file() else {}
    if not before and not resumed:
        before = per_source()
        if info.is_main:
            write_json(before_file, before)

    # every data-parallel rank takes its share of each global micro-batch of batch_size * dp_size
    plan = BatchPlan([e.shape[1] for e in train], cfg.batch_size * info.dp_size, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step(step: int) -> dict:
        batches = []
        for m in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
            ids, counts = dist.rank_slice(plan(m), info)
            batches.append((*pad_batch([train[i] for i in ids], tokenizer.pad_id), counts))
        # the step's loss is the mean over all its reply tokens, however they fall in batches
        # and ranks (gradient reductions average over ranks: hence the factor dp_size)
        mine = sum(int((y != IGNORE).sum()) for _, y, counts in batches if counts)
        n_targets = max(1.0, dist.total(mine, info, device))
        loss_sum, tokens = 0.0, 0
        for micro, (x, y, counts) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            with dist.no_sync(train_model, micro < len(batches) - 1):
                with autocast(device):
                    logits = train_model(x)
                nll, _ = masked_nll(logits, y)
                (nll * (info.dp_size * counts / n_targets)).backward()
            loss_sum += nll.item() * counts
            tokens += int((x != tokenizer.pad_id).sum()) * counts
        grad_norm = dist.clip_grad_norm(params, cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the clock averages over ranks: this rank's reply-token loss sum, times the ranks
        loss = (loss_sum * info.dp_size, n_targets)
        return {"loss": loss, "grad_norm": grad_norm, "tokens": tokens}

    def run_eval(step: int) -> dict:
        if not val or not (info.is_main or info.sharded):  # sharded: every rank in each forward
            return {}
        loss = evaluate(model, val, cfg.batch_size, tokenizer.pad_id, device)
        return {"val_loss": loss} if info.is_main else {}

    def save(step: int, loop_state: dict) -> None:
        save_step(
            ckpt_root, step, model, optimizer, {"micro_batches": step * cfg.grad_accum},
            info, cfg.keep_last, model_dir, tokenizer.pad_id, write_weights,
            extra={"log": loop_state},
        )  # fmt: skip

    model.train()
    done = fit(
        cfg, optimizer, train_step, run_eval, save, out_dir=out_dir, desc="sft",
        resumed=resumed, info=info, device=device,
        flops_per_token=flops_per_token(model.cfg, cfg.seq_len),
    )  # fmt: skip
    step, interrupted = done["step"], done["interrupted"]
    after = {} if interrupted else per_source()  # every rank of a sharded model takes part
    if not interrupted and not use_lora:
        save_final(
            model, out_dir / "model", info, tokenizer_dir=model_dir, pad_token_id=tokenizer.pad_id
        )
    if not info.is_main:
        return {"step": step, "interrupted": interrupted, "rank": info.rank}

    # --- outputs
    summary = {
        "step": step,
        "max_steps": cfg.max_steps,
        "interrupted": interrupted,
        "params": n_params,
        "trainable_params": trainable,
        "lora": dataclasses.asdict(lora_cfg) if use_lora else None,
        "examples": {"train": len(train), "val": len(val)},
        "data": stats["sources"],
        "bad_rows": len(stats["problems"]),
        "val_loss": done["eval"].get("val_loss", math.nan),
        "val_loss_by_source": {
            name: {"before": before.get(name, math.nan), "after": loss}
            for name, loss in after.items()
        },
        "train_seconds": done["train_seconds"],
        "peak_memory_mb": done["peak_memory_mb"],  # per rank
        "device": str(device),
        "world_size": info.world_size,
        "strategy": info.strategy if info.enabled else "none",
        "base_model": str(model_dir),
    }
    if "tokens_per_s" in done:
        summary["tokens_per_s"] = done["tokens_per_s"]
    if device.type == "cuda":
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:  # the process's peak resident memory (Linux reports KiB): weights, optimizer, activations
        summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not interrupted:
        if use_lora:
            with atomic_dir(out_dir / "adapter") as tmp:
                save_adapter(model, tmp, str(model_dir))
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png", title="SFT loss")
    write_json(out_dir / "summary.json", summary)
    return summary
