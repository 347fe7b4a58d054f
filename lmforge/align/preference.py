"""Preference pairs: one prompt, a preferred (`chosen`) and a dispreferred (`rejected`) answer.
Read from JSONL in the three layouts the field uses, encoded with the chat template, batched.

The one idea: a pair is (prompt messages, chosen text, rejected text) whatever the file looked
like, and the two answers are encoded exactly as the model will generate them: the prompt is
rendered with the generation prompt, and an answer is the assistant reply the template adds
after it (content plus end-of-turn marker). Reward models score the last answer token; DPO
sums log-probabilities over the answer tokens only (the prompt is the same on both sides, so it
only adds noise).

Layouts (one JSON object per line):
- HH-RLHF: `chosen` and `rejected` are whole dialogues "\\n\\nHuman: ...\\n\\nAssistant: ..."
  that share every turn but the last assistant reply.
- ShareGPT (LLaMA-Factory): `conversations` [{from: human|gpt|system, value}], `chosen` and
  `rejected` {from: gpt, value}.
- Plain (TRL-style): `prompt` (a string or a messages list), `chosen` and `rejected` (strings,
  or an assistant message, or a messages list ending with one).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.align.rollout import pad_rollouts
from lmforge.config import (
    ConfigError,
    DistConfig,
    PreferenceDataConfig,
    PreferenceSourceConfig,
    resolve_path,
)
from lmforge.data.batches import BatchPlan
from lmforge.data.readers import DataError, is_val, read_jsonl
from lmforge.model.load import load, model_source
from lmforge.perf import autocast, pick_device
from lmforge.tokenizer import ROLES, Tokenizer
from lmforge.train import dist
from lmforge.train.checkpoint import resume_latest, save_step
from lmforge.train.loop import fit
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import make_optimizer
from lmforge.train.run_dir import run_config, start_run

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES["system"] = "system"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Pair:
    prompt: list[dict]  # messages ending with a user turn
    chosen: str
    rejected: str


# --------------------------------------------------------------------------- rows


def _hh_dialogue(text: str, field: str) -> list[dict]:
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"field {field!r} is not an HH dialogue ('\\n\\nHuman: ...')")
    return [
        {"role": "user" if who == "Human" else "assistant", "content": body.strip()}
        for who, body in zip(parts[1::2], parts[2::2])
    ]


def _answer(value, field: str) -> tuple[list[dict], str]:
    """(messages before the answer, answer text) of a `chosen`/`rejected` value."""
    if isinstance(value, str):
        return [], value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        msgs = [parse_message(m, f"{field}[{i}]") for i, m in enumerate(value)]
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"field {field!r} must end with an assistant message")
        return msgs[:-1], msgs[-1]["content"]
    raise ValueError(f"field {field!r} must be a string, a message or a list of messages")


def parse_message(m: dict, where: str) -> dict:
    role = m.get("role", SHAREGPT_ROLES.get(m.get("from")))
    content = m.get("content", m.get("value"))
    if role not in ROLES:
        raise ValueError(f"{where}: role must be one of {ROLES} (or ShareGPT's human/gpt)")
    if not isinstance(content, str):
        raise ValueError(f"{where}: content must be a string")
    return {"role": role, "content": content}


def row_to_pair(row, system_prompt: str = "") -> Pair:
    """One JSONL row -> a Pair. Raises ValueError naming what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"missing field {missing[0]!r} (a pair needs 'chosen' and 'rejected')")
    if isinstance(row["chosen"], str) and HH_TURN.match(row["chosen"]):
        chosen, rejected = (
            _hh_dialogue(row["chosen"], "chosen"),
            _hh_dialogue(row["rejected"], "rejected"),
        )
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("chosen and rejected dialogues differ before their last turn")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError("an HH dialogue must end with an Assistant turn")
        prompt, good, bad = chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
    else:
        if "conversations" in row:
            turns = row["conversations"]
            if not isinstance(turns, list):
                raise ValueError("field 'conversations' must be a list")
            prompt = [parse_message(m, f"conversations[{i}]") for i, m in enumerate(turns)]
        elif "prompt" in row:
            p = row["prompt"]
            if isinstance(p, str):
                prompt = [{"role": "user", "content": p}]
            elif isinstance(p, list):
                prompt = [parse_message(m, f"prompt[{i}]") for i, m in enumerate(p)]
            else:
                raise ValueError("field 'prompt' must be a string or a list of messages")
        else:
            prompt = []
        before_good, good = _answer(row["chosen"], "chosen")
        before_bad, bad = _answer(row["rejected"], "rejected")
        if before_good != before_bad:
            raise ValueError("chosen and rejected carry different conversations before the answer")
        prompt += before_good
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn")
    if not good.strip() or not bad.strip():
        raise ValueError(f"the {'chosen' if not good.strip() else 'rejected'} answer is empty")
    if good.strip() == bad.strip():
        raise ValueError("chosen and rejected answers are identical")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return Pair(prompt, good, bad)


def read_pairs(
    src: PreferenceSourceConfig, base_dir: str, system_prompt: str = "", skip_bad_rows: bool = False
) -> tuple[list[Pair], list[str]]:
    path = resolve_path(src.path, base_dir)
    if not path.is_file():
        raise DataError(f"preference source {src.name!r}: file not found: {path}")
    pairs, problems = read_jsonl(
        path, lambda row: row_to_pair(row, system_prompt), skip_bad_rows, src.max_rows, "pair"
    )
    if not pairs:
        raise DataError(f"preference source {src.name!r}: {path} has no usable pairs")
    return pairs, problems


# --------------------------------------------------------------------------- tokens


def prompt_ids(tok: Tokenizer, prompt: list[dict]) -> list[int]:
    """BOS (where used), the conversation and the assistant's generation prompt."""
    return tok.chat_prefix(prompt) + tok.encode_chat(prompt, add_generation_prompt=True)


def answer_ids(tok: Tokenizer, prompt: list[dict], answer: str) -> list[int]:
    """The reply the template adds for `answer` after the prompt: content and end-of-turn."""
    segments = tok.encode_chat_segments([*prompt, {"role": "assistant", "content": answer}])
    return [ids for ids, is_reply in segments if is_reply][-1]


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    source: str = ""  # name of the source it came from (per-source held-out metrics)

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def encode_pair(
    tok: Tokenizer, pair: Pair, seq_len: int, max_prompt_len: int
) -> tuple[EncodedPair | None, str]:
    """(encoded, status): status "ok" or "truncated" (the prompt keeps its last max_prompt_len
    tokens, answers are cut so prompt + answer <= seq_len), or (None, "dropped") when the
    answers are identical once cut."""
    p = prompt_ids(tok, pair.prompt)
    good, bad = (
        answer_ids(tok, pair.prompt, pair.chosen),
        answer_ids(tok, pair.prompt, pair.rejected),
    )
    status = "ok"
    if len(p) > max_prompt_len:
        p, status = p[-max_prompt_len:], "truncated"
    room = seq_len - len(p)
    if len(good) > room or len(bad) > room:
        good, bad, status = good[:room], bad[:room], "truncated"
    if good == bad:
        return None, "dropped"
    return EncodedPair(p, good, bad), status


def build_pairs(
    cfg: PreferenceDataConfig, tok: Tokenizer, base_dir: str
) -> tuple[list, list, dict]:
    """Train and held-out encoded pairs of every source, and counts for the summary. A pair is
    held out by a hash of its prompt, so one prompt never lands on both sides."""
    if not cfg.sources:
        raise ConfigError("sources is empty: name at least one JSONL file of preference pairs")
    train, val, stats = [], [], {"sources": {}, "problems": []}
    for src in cfg.sources:
        pairs, problems = read_pairs(src, base_dir, cfg.system_prompt, cfg.skip_bad_rows)
        stats["problems"] += problems
        s = {"rows": len(pairs), "bad_rows": len(problems), "truncated": 0, "dropped": 0}
        s.update(train=0, val=0)
        for pair in pairs:
            enc, status = encode_pair(tok, pair, cfg.seq_len, cfg.max_prompt_len)
            if enc is None:
                s["dropped"] += 1
                continue
            s["truncated"] += status == "truncated"
            held_out = is_val(json.dumps(pair.prompt, ensure_ascii=False), cfg.val_fraction)
            enc.source = src.name
            (val if held_out else train).append((enc, pair))
            s["val" if held_out else "train"] += 1
        stats["sources"][src.name] = s
    if not train:
        raise ConfigError("no training pairs left (all dropped or held out)")
    return train, val, stats


def pair_batch(
    pairs: list[EncodedPair], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen answers in rows [0, B), rejected in [B, 2B): ids (2B, T) right-padded, the answer
    mask (2B, T-1) over targets, and each row's length (2B,)."""
    prompts = [e.prompt for e in pairs] * 2
    answers = [e.chosen for e in pairs] + [e.rejected for e in pairs]
    ids, mask = pad_rollouts(prompts, answers, pad_id)
    lengths = torch.tensor([len(p) + len(a) for p, a in zip(prompts, answers)])
    return ids, mask, lengths


def lengths_of(pairs: list[EncodedPair]) -> np.ndarray:
    return np.asarray([e.length for e in pairs])


# --------------------------------------------------------------------------- the loop


def setup(
    cfg: PreferenceDataConfig,
    model_dir,
    out_dir,
    base_dir: str,
    stage: str,
    sections: tuple = (),
    info: dist.DistInfo | None = None,
):
    """What reward and DPO start with: (device, model, tokenizer, tokenizer directory, train
    pairs, held-out pairs, data stats), out_dir ready for the run (state.start_run; `sections`:
    other configs that define it). The model is loaded as for inference (an adapter is merged)
    and must hold seq_len tokens."""
    dp_size = info.dp_size if info else 1
    config = run_config(cfg, *sections, dp_size=dp_size, model_dir=model_dir)
    start_run(out_dir, stage, config, cfg.resume, cfg.overwrite, info)
    device = dist.device_for(info or dist.DistInfo(), pick_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load(model_dir, device=device, trainable=True)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"{stage}.seq_len ({cfg.seq_len}) exceeds the model's context ({model.cfg.max_seq_len})"
        )
    train, val, stats = build_pairs(cfg, tok, base_dir)
    return device, model, tok, model_source(model_dir), train, val, stats


def train_pairs(
    cfg: PreferenceDataConfig,
    model: torch.nn.Module,
    train_lengths: list[int],
    loss_fn,
    eval_fn,
    out_dir: Path,
    save: dict,
    desc: str,
    dist_cfg: DistConfig | None = None,
    info: dist.DistInfo | None = None,
) -> dict:
    """The optimisation loop shared by the reward model and DPO: length-sorted batches of
    pair indices (a pure function of the step, so resuming needs only the step), gradient
    accumulation, clipping, the learning-rate schedule, metrics, evaluation, checkpoints and
    Ctrl-C. loss_fn(indices, module) -> (mean loss of those pairs, {metric: float}), calling
    `module` (the model, or its DDP wrapper) for the trained model's outputs;
    eval_fn() -> {metric: float}. save: save_checkpoint's tokenizer_dir, pad_token_id,
    write_weights and read_weights. Under torchrun (`info`: ddp, or fsdp) each rank
    takes its share of every global batch of batch_size * dp_size pairs; rank 0 evaluates
    (every rank, for a sharded model) and writes. Runs on the training clock (train/loop.py):
    returns its summary (step, interrupted, train_seconds, eval: the last evaluation)."""
    dist_cfg, info = dist_cfg or DistConfig(), info or dist.DistInfo()
    device = next(model.parameters()).device
    train_model = dist.parallelize(model, dist_cfg, info, device)
    optimizer = make_optimizer(model, cfg, device)
    ckpt_root = out_dir / "checkpoints"
    read_weights = save.pop("read_weights", None)
    resumed = resume_latest(ckpt_root, model, optimizer, None, cfg.resume, info, read_weights)
    params = [p for p in model.parameters() if p.requires_grad]
    plan = BatchPlan(train_lengths, cfg.batch_size * info.dp_size, cfg.seed)

    def train_step(step: int) -> dict:
        logged: dict = {}
        for m in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
            pairs = plan(m)
            ids, counts = dist.rank_slice(pairs, info)
            # this rank's share of the global mean (reductions average over dp_size ranks)
            share = len(ids) / len(pairs) * counts / cfg.grad_accum
            with dist.no_sync(train_model, m < (step + 1) * cfg.grad_accum - 1):
                with autocast(device):
                    loss, stats = loss_fn(ids, train_model)
                (loss * (share * info.dp_size)).backward()
            for k, v in {"loss": loss.item(), **stats}.items():  # the clock averages over ranks
                logged[k] = logged.get(k, 0.0) + v * share * info.dp_size
        logged["grad_norm"] = dist.clip_grad_norm(params, cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logged

    def evaluate(step: int) -> dict:
        if not (info.is_main or info.sharded):  # a sharded model needs every rank in each forward
            return {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            result = eval_fn()
        model.train(was_training)
        return result if info.is_main else {}

    def checkpoint(step: int, loop_state: dict) -> None:
        micro = {"micro_batches": step * cfg.grad_accum}
        save_step(
            ckpt_root, step, model, optimizer, micro, info, cfg.keep_last, **save,
            extra={"log": loop_state},
        )  # fmt: skip

    model.train()
    return fit(
        cfg, optimizer, train_step, evaluate, checkpoint, out_dir=out_dir, desc=desc,
        resumed=resumed, info=info, device=device,
    )  # fmt: skip


def plot_curves(metrics_path: Path, png_path: Path, keys: list[str], title: str) -> Path:
    """One panel per metric key against the step (training rows and held-out rows alike)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), dpi=110)
    for ax, k in zip(np.atleast_1d(axes), keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), marker="o" if k.startswith("val_") else None, ms=3, lw=1.2)
        ax.set_title(k.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
