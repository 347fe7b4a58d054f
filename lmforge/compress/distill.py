"""Knowledge distillation (`lmforge distill`): train a smaller student on a teacher's logits.

The one idea (Hinton et al. 2015, arXiv:1503.02531): the teacher's whole next-token
distribution says more per token than the one-hot target, e.g. which other words were
plausible, so a student that matches it learns faster from the same tokens. Both distributions
are softened with a temperature T; the KL term is scaled by T^2 so its gradients keep the size
of the cross-entropy's as T changes. To show what the teacher is worth, the identical student
(same initial weights, same batches, same steps) also trains without it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.compress.train import (
    byte_table,
    check_data,
    load_float_model,
    setup_device,
    train,
    val_losses,
    validate,
)
from lmforge.config import ConfigError, DistConfig, DistillConfig, ModelConfig
from lmforge.io import write_json
from lmforge.model.transformer import GPT, num_params
from lmforge.train import dist
from lmforge.train.run_dir import run_config, start_run


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student,
    targets). Logits (..., V), targets (...). Returns (loss, kl, ce), each a mean over tokens;
    kl is the plain KL at temperature T (without the T^2)."""
    log_p_s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)  # (N, V)
    ce = F.nll_loss(log_p_s, targets.flatten())
    # at T = 1 (the default) both terms share one log-softmax: passes over the (N, V) logits
    # are a good part of a small student's step on a CPU
    log_q_s = log_p_s
    if temperature != 1:
        log_q_s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    with torch.no_grad():  # the teacher's side is a constant
        log_q_t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
        q_t = log_q_t.exp()
        neg_entropy = (q_t * log_q_t).sum(-1).mean()
    kl = neg_entropy - (q_t * log_q_s).sum(-1).mean()  # mean of sum_v q_t (log q_t - log q_s)
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def student_config(teacher: ModelConfig, cfg: DistillConfig) -> ModelConfig:
    """The teacher's family, vocabulary, context and positions, with the student's shape. Heads
    default to the teacher's head width (dim / teacher.head_dim heads)."""
    n_head = cfg.n_head
    if not n_head:
        if cfg.dim % teacher.head_dim:
            raise ConfigError(
                f"distill.dim ({cfg.dim}) is not a multiple of the teacher's head width "
                f"({teacher.head_dim}); set distill.n_head"
            )
        n_head = cfg.dim // teacher.head_dim
    if cfg.dim % n_head:
        raise ConfigError(f"distill.dim ({cfg.dim}) must be divisible by distill.n_head ({n_head})")
    n_kv_head = cfg.n_kv_head or n_head
    if n_head % n_kv_head:
        raise ConfigError(
            f"distill.n_head ({n_head}) must be divisible by distill.n_kv_head ({n_kv_head})"
        )
    try:
        return dataclasses.replace(
            teacher,
            dim=cfg.dim,
            n_layer=cfg.n_layer or teacher.n_layer,
            n_head=n_head,
            n_kv_head=n_kv_head,
            head_dim=cfg.dim // n_head,
            ffn_dim=cfg.ffn_dim,  # 0: the default for the student's width
        )
    except ConfigError as e:
        raise ConfigError(f"distill: the student's shape does not work: {e}") from None


def run(
    cfg: DistillConfig, model_dir, data_dir, out_dir, dist_cfg: DistConfig | None = None
) -> dict:
    """Distil the model in model_dir into a smaller student; writes out_dir/model (and
    out_dir/baseline/model, the student trained without the teacher) and summary.json. Under
    torchrun (dist.strategy ddp) every rank calls this; rank 0 writes the files."""
    args = (cfg, Path(model_dir), Path(data_dir), Path(out_dir))
    return dist.launch(dist_cfg, _run, *args)


def _run(cfg, model_dir: Path, data_dir: Path, out_dir: Path, dist_cfg, info) -> dict:
    # --- setup
    dist.ddp_only(info, "distill")
    device = setup_device(cfg, info)
    teacher, tokenizer, source = load_float_model(model_dir, device, "distill")
    teacher.requires_grad_(False)
    check_data(data_dir, tokenizer, teacher, cfg.seq_len, "distill")
    student_cfg = student_config(teacher.cfg, cfg)
    token_bytes = byte_table(tokenizer, teacher.cfg.vocab_size, device)
    config = run_config(cfg, dp_size=info.dp_size, model_dir=model_dir, data_dir=data_dir)
    start_run(out_dir, "distill", config, cfg.resume, cfg.overwrite, info)

    def new_student() -> GPT:  # the same initial weights for both students
        torch.manual_seed(cfg.seed)
        return GPT(student_cfg).to(device)

    def kd_loss(model, x, y):
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss, kl, ce = distill_loss(model(x), teacher_logits, y, cfg.temperature, cfg.alpha)
        return loss, {"kl": kl, "ce": ce}

    # --- train
    teacher_val = validate(teacher, cfg, data_dir, token_bytes) if info.is_main else {}
    on = {"dist_cfg": dist_cfg, "info": info}
    student = train(new_student(), cfg, data_dir, out_dir, source, kd_loss, desc="distill", **on)
    baseline = None
    if cfg.baseline and not student["interrupted"]:
        baseline = train(
            new_student(), cfg, data_dir, out_dir / "baseline", source, desc="baseline", **on
        )
    if not info.is_main:
        return {"step": student["step"], "interrupted": student["interrupted"], "rank": info.rank}

    # --- outputs
    summary = {
        "step": student["step"] if baseline is None else baseline["step"],
        "interrupted": student["interrupted"] or bool(baseline and baseline["interrupted"]),
        "teacher": {"dir": str(model_dir), "params": num_params(teacher), "val": teacher_val},
        "student": student,
        "baseline": baseline,
        "student_model": dataclasses.asdict(student_cfg),
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
    }
    if summary["interrupted"]:
        return summary
    line = f"student ({student['params'] / 1e6:.2f} M params) val "
    line += " / ".join(f"{lang} {r['loss']:.2f}" for lang, r in student["val"].items())
    line += " nats/token"
    if baseline:
        line += f" vs {val_losses(baseline['val'])} without the teacher"
    line += f" (teacher {val_losses(teacher_val)}, {num_params(teacher) / 1e6:.2f} M params)"
    summary["headline"] = line
    write_json(out_dir / "summary.json", summary)
    return summary
