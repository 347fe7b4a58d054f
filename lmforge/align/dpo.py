"""Direct preference optimisation (`lmforge dpo`, Rafailov et al. 2023, arXiv:2305.18290).

The one idea: the RLHF objective (maximise reward, KL-penalised to a reference) has a closed-form
optimum in which the reward is beta * log(pi / pi_ref) up to a per-prompt constant. Substituting
that implicit reward into the Bradley-Terry loss leaves a classification loss on the policy's own
log-probabilities: no reward model, no sampling. The frozen reference is the starting model; the
"rewards" logged are the implicit ones, beta * (log pi - log pi_ref) of each answer, and their
margin and sign (accuracy) show how far the policy has moved its preferences. Log-probabilities
are summed over answer tokens only (IPO uses their mean, as TRL does).

With `judge` set (a reward model), the run ends by answering held-out prompts greedily with the
reference and with the trained policy and reports the judge's win rate of policy over reference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.align.preference import (
    pair_batch,
    plot_curves,
    prompt_ids,
    setup,
    train_pairs,
)
from lmforge.align.reward import load_reward_model, score_ids
from lmforge.align.rollout import sample_answers, token_logprobs
from lmforge.config import ConfigError, DistConfig, DPOConfig, LoRAConfig
from lmforge.infer.chat import stop_ids
from lmforge.infer.cpu_decode import relayout
from lmforge.io import atomic_dir, write_json
from lmforge.model.load import load, model_source
from lmforge.model.lora import apply_lora, load_adapter_weights, save_adapter
from lmforge.model.transformer import num_params
from lmforge.train import dist
from lmforge.train.checkpoint import save_final


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair losses from answer log-probs (B,). sigmoid: -log sigmoid(beta * margin), with
    conservative-DPO label smoothing eps: a share eps of labels assumed flipped. ipo: squared
    distance of the margin to 1 / (2 beta) (Azar et al. 2023), which does not saturate."""
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    if loss == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(
        -beta * margin
    )


def answer_logps(model, ids: torch.Tensor, mask: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) of log pi over each row's answer tokens: ids (N, T), mask (N, T-1) -> (N,)."""
    lp = (token_logprobs(model, ids) * mask).sum(-1)
    return lp / mask.sum(-1).clamp(min=1) if mean else lp


def chosen_nll(pi_chosen: torch.Tensor, n_tokens: torch.Tensor, mean: bool) -> torch.Tensor:
    """Mean per-token negative log-likelihood of the chosen answers (RPO's extra term, Pang et
    al. 2024): keeps the answers DPO prefers likely, end-of-turn marker included, so the policy
    does not drift into long, unterminated text while it moves the margins."""
    return -(pi_chosen if mean else pi_chosen / n_tokens).mean()


def preference_stats(pi: torch.Tensor, ref: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Implicit rewards of a batch: pi and ref are (2B,) answer log-probs, chosen rows first."""
    r_c, r_r = (beta * (pi - ref)).chunk(2)
    return {
        "reward_chosen": r_c,
        "reward_rejected": r_r,
        "margin": r_c - r_r,
        "accuracy": (r_c > r_r).float(),
    }


# --------------------------------------------------------------------------- judge


def judge_win_rate(
    cfg: DPOConfig, policy, reference, tok, prompts: list[list[dict]], device
) -> dict:
    """Greedy answers of both models to held-out prompts, scored by the reward model cfg.judge:
    the share of prompts where the policy's answer scores higher (ties count half)."""
    rm, _ = load_reward_model(cfg.judge, device=device)
    ids = [prompt_ids(tok, p)[-cfg.max_prompt_len :] for p in prompts]
    kw = dict(max_new_tokens=cfg.judge_max_new_tokens, temperature=0.0, stop_ids=stop_ids(tok))
    answers = {
        name: sample_answers(m, ids, 1, **kw)
        for name, m in tqdm(
            (("policy", policy), ("reference", reference)), desc="judge", unit="model", leave=False
        )
    }
    scores = {}
    with torch.no_grad():
        for name, a in answers.items():
            a = [x[: rm.cfg.max_seq_len - len(p)] or [tok.eos_id] for p, x in zip(ids, a)]
            scores[name] = [
                s
                for i in range(0, len(ids), 16)
                for s in score_ids(rm, ids[i : i + 16], a[i : i + 16], tok.pad_id, device)
            ]
    wins = [
        1.0 if p > r else 0.5 if p == r else 0.0
        for p, r in zip(scores["policy"], scores["reference"])
    ]
    examples = [
        {
            "prompt": prompts[i][-1]["content"][:200],
            "reference": tok.decode(answers["reference"][i]),
            "policy": tok.decode(answers["policy"][i]),
            "reference_reward": scores["reference"][i],
            "policy_reward": scores["policy"][i],
        }
        for i in range(min(4, len(prompts)))
    ]
    n = max(1, len(wins))
    return {
        "judge": str(cfg.judge),
        "prompts": len(wins),
        "win_rate": sum(wins) / n,
        "policy_reward": sum(scores["policy"]) / n,
        "reference_reward": sum(scores["reference"]) / n,
        "examples": examples,
    }


# --------------------------------------------------------------------------- driver


def run(
    cfg: DPOConfig,
    lora_cfg: LoRAConfig,
    model_dir,
    out_dir,
    base_dir: str = ".",
    dist_cfg: DistConfig | None = None,
) -> dict:
    """Align the model in model_dir (usually the SFT model) to preference pairs; writes
    out_dir/model (out_dir/adapter with lora.r), metrics.jsonl, curves.png, summary.json.
    Under torchrun (dist.strategy ddp, or fsdp without LoRA) every rank calls this; rank 0
    writes the files and runs the judge."""
    # the adapters: lora_cfg (callers pass cfg.lora) with the rank cfg.lora.r
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(lora_cfg, r=cfg.lora.r))
    if cfg.lora.r and model_source(model_dir) != Path(model_dir):
        # the new adapter would be saved against the plain base model, so loading it would
        # silently drop the adapter it started from
        raise ConfigError(
            f"dpo.lora.r with a LoRA adapter to start from ({model_dir}): merge it first "
            "(lmforge export ADAPTER OUT) and start from OUT, or use full DPO (dpo.lora.r 0)"
        )
    return dist.launch(dist_cfg, _run, cfg, model_dir, Path(out_dir), base_dir)


def _run(cfg, model_dir, out_dir: Path, base_dir, dist_cfg, info) -> dict:
    # --- setup
    dist.data_parallel_only(info, "dpo", bool(cfg.lora.r))
    device, policy, tok, tok_dir, train, val, stats = setup(
        cfg, model_dir, out_dir, base_dir, "dpo", (), info
    )
    train_enc, val_enc = [e for e, _ in train], [e for e, _ in val]
    if not info.sharded:  # before the optimizer: the judge's engine would relayout it later
        relayout(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if info.sharded:  # the frozen reference is sharded like the policy (forward passes only)
        dist.parallelize(reference, dist_cfg, info, device)
    torch.manual_seed(cfg.seed)
    use_lora = bool(cfg.lora.r)
    if use_lora:
        apply_lora(policy, cfg.lora, seed=cfg.seed)
    mean = cfg.loss == "ipo"

    def logps(model, pairs):
        ids, mask, _ = pair_batch(pairs, tok.pad_id)
        return answer_logps(model, ids.to(device), mask.to(device), mean)

    # --- loop
    def loss_fn(indices, module):
        pairs = [train_enc[i] for i in indices]
        with torch.no_grad():
            ref = logps(reference, pairs)
        pi = logps(module, pairs)
        pi_c, pi_r = pi.chunk(2)
        ref_c, ref_r = ref.chunk(2)
        loss = dpo_loss(pi_c, pi_r, ref_c, ref_r, cfg.beta, cfg.loss, cfg.label_smoothing).mean()
        stats = {
            k: v.mean().item() for k, v in preference_stats(pi.detach(), ref, cfg.beta).items()
        }
        if cfg.sft_weight:
            n_tokens = torch.tensor([len(e.chosen) for e in pairs], device=device)
            nll = chosen_nll(pi_c, n_tokens, mean)
            loss = loss + cfg.sft_weight * nll
            stats["chosen_nll"] = nll.item()
        return loss, stats

    def eval_fn():
        if not val_enc:
            return {}
        totals: dict[str, float] = {}
        for i in range(0, len(val_enc), cfg.batch_size):
            pairs = val_enc[i : i + cfg.batch_size]
            pi, ref = logps(policy, pairs), logps(reference, pairs)
            losses = dpo_loss(*pi.chunk(2), *ref.chunk(2), cfg.beta, cfg.loss, cfg.label_smoothing)
            for k, v in {"loss": losses, **preference_stats(pi, ref, cfg.beta)}.items():
                totals[k] = totals.get(k, 0.0) + v.sum().item()
        return {f"val_{k}": v / len(val_enc) for k, v in totals.items()}

    write_weights = (lambda d: save_adapter(policy, d, str(tok_dir))) if use_lora else None
    read_weights = (lambda d: load_adapter_weights(policy, d)) if use_lora else None
    done = train_pairs(
        cfg,
        policy,
        [e.length for e in train_enc],
        loss_fn,
        eval_fn,
        out_dir,
        {
            "tokenizer_dir": tok_dir,
            "pad_token_id": tok.pad_id,
            "write_weights": write_weights,
            "read_weights": read_weights,
        },
        "dpo",
        dist_cfg,
        info,
    )
    if not done["interrupted"] and not use_lora:
        save_final(policy, out_dir / "model", info, tokenizer_dir=tok_dir, pad_token_id=tok.pad_id)
    if not info.is_main:
        return {"step": done["step"], "interrupted": done["interrupted"], "rank": info.rank}
    if info.sharded:  # the judge generates on rank 0 alone, with whole models read back
        policy = load(out_dir / "model", device=device)[0]
        reference = load(model_dir, device=device)[0]

    # --- outputs
    ev = done["eval"]
    summary = {
        **{k: done[k] for k in ("step", "interrupted", "train_seconds")},
        "max_steps": cfg.max_steps,
        "params": num_params(policy),
        "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "beta": cfg.beta,
        "loss_type": cfg.loss,
        "lora_r": cfg.lora.r,
        "pairs": {"train": len(train_enc), "val": len(val_enc)},
        "data": stats["sources"],
        "bad_rows": len(stats["problems"]),
        **ev,
        "base_model": str(model_dir),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_mb": done["peak_memory_mb"],  # per rank
    }
    headline = (
        f"held-out preference accuracy {ev.get('val_accuracy', math.nan):.3f}, "
        f"margin {ev.get('val_margin', math.nan):.3f} after {done['step']} steps"
    )
    if not done["interrupted"]:
        if cfg.judge and val:
            judged = judge_win_rate(
                cfg, policy, reference, tok, [p.prompt for _, p in val[: cfg.judge_prompts]], device
            )
            summary["judge"] = judged
            headline += f"; reward-model win rate vs the starting model {judged['win_rate']:.3f} on {judged['prompts']} prompts"
        if use_lora:
            with atomic_dir(out_dir / "adapter") as tmp:
                save_adapter(policy, tmp, str(tok_dir))
        plot_curves(
            out_dir / "metrics.jsonl",
            out_dir / "curves.png",
            [
                "loss",
                "margin",
                "accuracy",
                "val_accuracy",
                "val_margin",
                "val_reward_chosen",
                "val_reward_rejected",
            ],
            f"DPO (beta {cfg.beta})",
        )
    summary["headline"] = headline
    write_json(out_dir / "summary.json", summary)
    return summary
