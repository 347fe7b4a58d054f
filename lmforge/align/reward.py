"""Reward models (`lmforge reward`): a Transformer that reads a conversation and returns one
number, trained so that the preferred answer of a pair scores higher.

The one idea (Bradley-Terry, as in InstructGPT): P(chosen > rejected) = sigmoid(r_c - r_r), so
the loss is -log sigmoid(r_c - r_r) and only score differences are learned. The score is a
linear head on the final hidden state of the answer's last token (the end-of-turn marker when
the answer was not cut), which has read the whole prompt and answer. The checkpoint is the
transformers layout of `LlamaForSequenceClassification` (or the Qwen2 / Mistral / GPT-2
class): the backbone's tensors without the LM head, plus `score.weight`, `num_labels: 1` and
`pad_token_id`, which transformers uses to find each row's last real token.
"""

from __future__ import annotations

import dataclasses
import math
import resource
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lmforge.align.preference import (
    EncodedPair,
    answer_ids,
    pair_batch,
    plot_curves,
    prompt_ids,
    setup,
    train_pairs,
)
from lmforge.align.rollout import pad_rollouts
from lmforge.config import ConfigError, DistConfig, RewardConfig
from lmforge.io import atomic_dir, read_json, write_json
from lmforge.model.checkpoint import TOKENIZER_FILES, load_config, model_from_tensors, read_tensors
from lmforge.model.hf import ARCHITECTURES, to_hf_config, to_hf_state_dict
from lmforge.model.transformer import GPT, num_params
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist


class RewardModel(nn.Module):
    """A GPT backbone and a scalar head on its final hidden states."""

    def __init__(self, body: GPT):
        super().__init__()
        self.body, self.cfg = body, body.cfg
        self.score = nn.Linear(body.cfg.dim, 1, bias=False)
        nn.init.normal_(self.score.weight, 0.0, body.cfg.init_std)
        self.body.lm_head.requires_grad_(body.cfg.tie_embeddings)  # untied: the head is unused

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) -> scores (B,) read at each row's last token."""
        h = self.body.features(ids)  # (B, T, dim)
        last = h[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1]
        return self.score(last).squeeze(-1).float()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log P(chosen > rejected) per pair, P = sigmoid(r_c - r_r)."""
    return -F.logsigmoid(r_chosen - r_rejected)


# --------------------------------------------------------------------------- checkpoints


def classifier_name(arch: str) -> str:
    return (
        ARCHITECTURES[arch]
        .replace("ForCausalLM", "ForSequenceClassification")
        .replace("LMHeadModel", "ForSequenceClassification")
    )


def save_reward_model(
    rm: RewardModel, out_dir: Path, tokenizer_dir: Path | None, pad_token_id: int | None
) -> None:
    """transformers' *ForSequenceClassification layout (the caller makes out_dir atomic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = rm.cfg
    hf = to_hf_config(cfg, pad_token_id=pad_token_id)
    hf.update(
        architectures=[classifier_name(cfg.arch)],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        problem_type="regression",
    )
    write_json(out / "config.json", hf)
    tensors = to_hf_state_dict(rm.body.state_dict(), cfg)
    tensors.pop("lm_head.weight", None)
    tensors["score.weight"] = rm.score.weight.detach().contiguous()
    save_file({k: v.cpu() for k, v in tensors.items()}, str(out / "model.safetensors"))
    for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
        src = Path(tokenizer_dir) / name
        if src.exists():
            (out / name).write_bytes(src.read_bytes())


def _reward_tensors(path: Path) -> tuple[dict, torch.Tensor]:
    hf = read_json(path / "config.json", "checkpoint config")
    arch = (hf.get("architectures") or [""])[0]
    if not arch.endswith("ForSequenceClassification") or hf.get("num_labels", 1) != 1:
        raise ConfigError(
            f"{path} is not a reward model: config.json has architectures {[arch]} and "
            f"num_labels {hf.get('num_labels')} (want *ForSequenceClassification, 1 label; "
            "train one with `lmforge reward`)"
        )
    tensors = read_tensors(path)
    if "score.weight" not in tensors:
        raise ConfigError(f"{path}: model.safetensors has no score.weight")
    return tensors, tensors.pop("score.weight")


def load_reward_model(path, device="cpu") -> tuple[RewardModel, Tokenizer]:
    """A reward model saved by `save_reward_model` or by transformers (*ForSequenceClassification,
    one label)."""
    path = Path(path)
    tensors, score = _reward_tensors(path)
    cfg = load_config(path)
    cfg.tie_embeddings = True  # no LM head in a classifier: tie so none is needed
    rm = RewardModel(model_from_tensors(cfg, tensors, path, device))
    with torch.no_grad():
        rm.score.weight.copy_(score)
    return rm.to(device).eval(), Tokenizer.load(path)


def _read_reward_weights(rm: RewardModel, path: Path) -> None:
    """Checkpoint counterpart of save_reward_model (for resuming)."""
    tensors, score = _reward_tensors(Path(path))
    loaded = model_from_tensors(
        dataclasses.replace(rm.cfg, tie_embeddings=True), tensors, Path(path)
    )
    sd = {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"}
    rm.body.load_state_dict(sd, strict=False)
    with torch.no_grad():
        rm.score.weight.copy_(score)


@torch.no_grad()
def score_answers(
    rm: RewardModel, tok: Tokenizer, prompts: list[list[dict]], answers: list[str], batch_size=16
) -> list[float]:
    """The reward of each (prompt messages, answer text), encoded as in training."""
    device = rm.score.weight.device
    out = []
    for i in range(0, len(prompts), batch_size):
        p = [prompt_ids(tok, m)[-rm.cfg.max_seq_len // 2 :] for m in prompts[i : i + batch_size]]
        a = [
            answer_ids(tok, m, t)
            for m, t in zip(prompts[i : i + batch_size], answers[i : i + batch_size])
        ]
        a = [x[: rm.cfg.max_seq_len - len(q)] for q, x in zip(p, a)]
        out += score_ids(rm, p, a, tok.pad_id, device)
    return out


def score_ids(rm: RewardModel, prompts, answers, pad_id: int, device) -> list[float]:
    """Rewards of prompt + answer token lists (no batching limit: the caller batches)."""
    ids, _ = pad_rollouts(prompts, answers, pad_id)
    lengths = torch.tensor([len(p) + len(a) for p, a in zip(prompts, answers)])
    return rm(ids.to(device), lengths).tolist()


# --------------------------------------------------------------------------- driver


def pairwise_accuracy(
    rm: RewardModel, pairs: list[EncodedPair], batch_size: int, pad_id: int
) -> dict:
    """Held-out loss, accuracy (ties count half) and mean margin r_c - r_r, overall and per
    source (`val_accuracy_<source>`)."""
    device = rm.score.weight.device
    losses, wins, margins = [], [], []
    for i in range(0, len(pairs), batch_size):
        ids, _, lengths = pair_batch(pairs[i : i + batch_size], pad_id)
        r = rm(ids.to(device), lengths)
        r_c, r_r = r.chunk(2)
        losses += bradley_terry_loss(r_c, r_r).tolist()
        margins += (r_c - r_r).tolist()
        wins += ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).tolist()
    if not pairs:
        return {}
    n = len(pairs)
    out = {
        "val_loss": sum(losses) / n,
        "val_accuracy": sum(wins) / n,
        "val_margin": sum(margins) / n,
    }
    for source in sorted({p.source for p in pairs}):
        mine = [w for w, p in zip(wins, pairs) if p.source == source]
        out[f"val_accuracy_{source}"] = sum(mine) / len(mine)
    return out


def run(
    cfg: RewardConfig, model_dir, out_dir, base_dir: str = ".", dist_cfg: DistConfig | None = None
) -> dict:
    """Train a reward model from the model in model_dir (usually the SFT model); writes
    out_dir/model, metrics.jsonl, curves.png and summary.json. Returns the summary. Under
    torchrun (dist.strategy ddp) every rank calls this; rank 0 evaluates and writes."""
    return dist.launch(dist_cfg, _run, cfg, model_dir, Path(out_dir), base_dir)


def _run(cfg, model_dir, out_dir: Path, base_dir, dist_cfg, info) -> dict:
    # --- setup
    dist.ddp_only(info, "reward")
    device, body, tok, tok_dir, train, val, stats = setup(
        cfg, model_dir, out_dir, base_dir, "reward", info=info
    )
    train_enc, val_enc = [e for e, _ in train], [e for e, _ in val]
    torch.manual_seed(cfg.seed)
    rm = RewardModel(body).to(device)

    # --- loop
    def loss_fn(indices, module):
        ids, _, lengths = pair_batch([train_enc[i] for i in indices], tok.pad_id)
        r_c, r_r = module(ids.to(device), lengths).chunk(2)
        loss = bradley_terry_loss(r_c, r_r).mean()
        if cfg.center_rewards:
            loss = loss + cfg.center_rewards * ((r_c + r_r) ** 2).mean()
        return loss, {
            "accuracy": (r_c > r_r).float().mean().item(),
            "margin": (r_c - r_r).mean().item(),
        }

    done = train_pairs(
        cfg,
        rm,
        [e.length for e in train_enc],
        loss_fn,
        lambda: pairwise_accuracy(rm, val_enc, cfg.batch_size, tok.pad_id),
        out_dir,
        {
            "tokenizer_dir": tok_dir,
            "pad_token_id": tok.pad_id,
            "write_weights": lambda d: save_reward_model(rm, d, tok_dir, tok.pad_id),
            "read_weights": lambda d: _read_reward_weights(rm, d),
        },
        "reward",
        dist_cfg,
        info,
    )
    if not info.is_main:
        return {"step": done["step"], "interrupted": done["interrupted"], "rank": info.rank}

    # --- outputs
    ev = done["eval"]
    summary = {
        **{k: done[k] for k in ("step", "interrupted", "train_seconds")},
        "max_steps": cfg.max_steps,
        "params": num_params(rm),
        "pairs": {"train": len(train_enc), "val": len(val_enc)},
        "data": stats["sources"],
        "bad_rows": len(stats["problems"]),
        **ev,
        "base_model": str(model_dir),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_mb": done["peak_memory_mb"],  # per rank
    }
    acc = ev.get("val_accuracy", math.nan)
    summary["headline"] = (
        f"held-out pairwise accuracy {acc:.3f} on {len(val_enc)} pairs after {done['step']} steps; "
        f"model in {out_dir / 'model'}"
    )
    if not done["interrupted"]:
        with atomic_dir(out_dir / "model") as tmp:
            save_reward_model(rm, tmp, tok_dir, tok.pad_id)
        plot_curves(
            out_dir / "metrics.jsonl",
            out_dir / "curves.png",
            ["loss", "accuracy", "val_accuracy", "val_margin"],
            "reward model",
        )
    write_json(out_dir / "summary.json", summary)
    return summary
