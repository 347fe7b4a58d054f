"""AdamW with weight-decay groups, and the learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.config import PretrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms' gains and embedding rows are not weights to shrink. Each
    group also lists its parameters' names, in the same order (checkpoints key on them)."""
    decay, no_decay = {"params": [], "names": []}, {"params": [], "names": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = name.endswith("tok_emb.weight")
        # Mamba's A_log sets each channel's memory length, not a weight to shrink (its paper's
        # code exempts it too)
        exempt = is_embedding or name.endswith("A_log")
        group = decay if p.dim() >= 2 and not exempt else no_decay
        group["params"].append(p)
        group["names"].append(name)
    return [
        {**decay, "weight_decay": weight_decay},
        {**no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module, cfg: PretrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """Fused AdamW where the build supports it (CUDA; CPU in recent torch), else foreach.
    Under tensor parallelism a group holds DTensors and whole tensors, which one fused call
    cannot mix: such a group is split in two with the same settings."""
    groups = []
    for group in param_groups(model, cfg.weight_decay):
        sharded = [isinstance(p, DTensor) for p in group["params"]]
        for keep in (False, True) if any(sharded) and not all(sharded) else (None,):
            part = [i for i, s in enumerate(sharded) if keep is None or s == keep]
            groups.append(
                {
                    **group,
                    "params": [group["params"][i] for i in part],
                    "names": [group["names"][i] for i in part],
                }
            )
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or
    warmup-stable-decay (hold the peak, then decay linearly over the last decay_frac of steps)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = int(cfg.max_steps * (1 - cfg.decay_frac))
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    return peak + (floor - peak) * min(1.0, progress)
