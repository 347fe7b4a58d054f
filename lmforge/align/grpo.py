"""Group-relative policy optimisation with verifiable rewards (`lmforge grpo`; DeepSeekMath,
arXiv:2402.03300): the policy answers each prompt several times, a checker scores every answer,
and answers better than their siblings are made more likely.

The one idea: no value model. An answer's baseline is the mean reward of the other answers to
the same prompt, and its advantage is its reward minus that mean, divided by the group's
standard deviation; every token of the answer shares it. A group whose answers all score the
same teaches nothing (zero advantage), so the reward must be something the model sometimes
gets right. The update is PPO's clipped surrogate plus a k3 KL penalty to the frozen starting
model, taken per token, averaged over each answer's tokens and then over answers. The prompts
and sampling seeds of a step are pure functions of the step, so a resumed run repeats the
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.align.preference import answer_ids, plot_curves
from lmforge.align.rollout import kl_k3, masked_mean, pad_rollouts, sample_answers, token_logprobs
from lmforge.config import ConfigError, GRPOConfig, resolve_path
from lmforge.infer.chat import chat_prompt_ids, stop_ids
from lmforge.infer.cpu_decode import relayout
from lmforge.io import atomic_dir, read_json, write_json
from lmforge.model.checkpoint import save_model
from lmforge.model.load import load, model_source
from lmforge.model.transformer import num_params
from lmforge.perf import pick_device
from lmforge.tasks.arithmetic import arithmetic_task
from lmforge.tasks.base import Problem, Task
from lmforge.tasks.gsm8k import gsm8k_task
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import resume_latest, save_step
from lmforge.train.loop import fit
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import make_optimizer
from lmforge.train.run_dir import run_config, start_run

COLD_START_STEP = 1_000_000  # cold-start problems are the task's draws from this step on
PROBE_STEP = 2_000_000  # training problems scored greedily at each evaluation

# --------------------------------------------------------------------------- tasks


def make_task(cfg: GRPOConfig, tok: Tokenizer, base_dir: str, max_prompt_len: int) -> Task:
    """The built-in task cfg.task, its prompts encoded for tok: a user turn in the chat
    template (cfg.chat), else plain text to complete ("7+5=", "Question: ...\nAnswer:")."""
    if cfg.chat and not tok.chat_template:
        raise ConfigError(
            "grpo.chat is true but the tokenizer has no chat template; set grpo.chat false"
        )

    def encode(user: str, plain: str) -> list[int]:
        if cfg.chat:
            return chat_prompt_ids(tok, [{"role": "user", "content": user}])
        return ([tok.bos_id] if tok.prepend_bos else []) + tok.encode(plain)

    def reply(user: str, answer: str) -> list[int]:
        if cfg.chat:
            return answer_ids(tok, [{"role": "user", "content": user}], answer)
        return tok.encode(answer) + [tok.eos_id]

    if cfg.task == "arithmetic":
        return arithmetic_task(cfg, tok, encode, reply, max_prompt_len)
    return gsm8k_task(cfg, tok, encode, resolve_path(cfg.path, base_dir), max_prompt_len)


# --------------------------------------------------------------------------- the algorithm


def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards, prompt-major in groups of group_size -> (N,) advantages
    (r - mean_group) / (std_group + 1e-4), std with Bessel's correction (as TRL). A group whose
    answers all score the same gets zeros."""
    r = rewards.float().view(-1, group_size)  # (P, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    return adv.flatten()


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer GRPO loss and KL, both (N,). Token log-probs are (N, T) under the policy,
    the policy that sampled (no grad) and the reference; adv is (N,); mask marks answer
    tokens. Per token: -min(ratio A, clip(ratio) A) + kl_coef * k3 KL; mean over the answer's
    tokens (DeepSeekMath's 1/|o_i|), so long and short answers weigh the same."""
    ratio = torch.exp(logp - old_logp)  # (N, T)
    a = adv[:, None]  # (N, 1): every token of an answer shares its advantage
    surrogate = torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = kl_k3(logp, ref_logp)  # (N, T)
    per_token = -surrogate + kl_coef * kl
    return masked_mean(per_token, mask, dim=1), masked_mean(kl.detach(), mask, dim=1)


def strip_stop(answer: list[int], stop: tuple[int, ...]) -> list[int]:
    return answer[:-1] if answer and answer[-1] in stop else answer


def grpo_step(
    policy,
    ref,
    optimizer,
    task: Task,
    problems: list[Problem],
    cfg: GRPOConfig,
    seed: int,
    pad_id: int,
    stop: tuple[int, ...],
) -> dict:
    """One rollout batch and cfg.iterations optimizer steps on it; returns the step's numbers.
    Request j of the rollout is sampled with seed + j. The caller sets the learning rate."""
    device, G = next(policy.parameters()).device, cfg.group_size
    # --- rollout: group_size answers per prompt, scored by the checker
    prompts = [p.prompt_ids for p in problems]
    answers = sample_answers(
        policy,
        prompts,
        G,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        stop_ids=stop,
        seed=seed,
        max_batch=min(64, len(prompts) * G),
    )
    N = len(answers)
    rewards = torch.tensor(
        [task.reward(problems[i // G], strip_stop(a, stop)) for i, a in enumerate(answers)]
    )
    adv = grpo_advantages(rewards, G)

    # --- score: the reference's (and, for several iterations, the sampler's) log-probs, once
    prompts = [p for p in prompts for _ in range(G)]  # one per answer
    batches = []
    for i in range(0, N, cfg.batch_size):
        ids, mask = pad_rollouts(
            prompts[i : i + cfg.batch_size], answers[i : i + cfg.batch_size], pad_id
        )
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            ref_lp = token_logprobs(ref, ids, cfg.temperature)
            # one iteration: the sampler is the policy being differentiated, so its log-probs
            # are logp.detach() (the ratio is exactly 1) and this forward can be skipped
            old_lp = token_logprobs(policy, ids, cfg.temperature) if cfg.iterations > 1 else None
        batches.append((ids, mask, old_lp, ref_lp, adv[i : i + cfg.batch_size].to(device)))

    # --- update: grad accumulation over micro-batches; the loss is a mean over all N answers
    kl_sum, loss_sum, grad_norm = 0.0, 0.0, 0.0
    params = [p for p in policy.parameters() if p.requires_grad]
    for it in range(cfg.iterations):
        for ids, mask, old_lp, ref_lp, a in batches:
            logp = token_logprobs(policy, ids, cfg.temperature)
            old = logp.detach() if old_lp is None else old_lp
            loss, kl = grpo_loss(logp, old, ref_lp, a, mask, cfg.clip_range, cfg.kl_coef)
            (loss.sum() / N).backward()
            loss_sum += loss.sum().item()
            kl_sum += kl.sum().item() if it == 0 else 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        grad_norm += norm.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        "reward": rewards.mean().item(),
        "accuracy": (rewards >= 1).float().mean().item(),
        "kl": kl_sum / N,
        "loss": loss_sum / (N * cfg.iterations),
        "answer_len": sum(len(a) for a in answers) / N,
        "stopped": sum(bool(a) and a[-1] in stop for a in answers) / N,
        "groups_with_signal": (adv.view(-1, G) != 0).any(1).float().mean().item(),
        "grad_norm": grad_norm / cfg.iterations,
    }


def rollout_seed(seed: int, step: int, n_answers: int) -> int:
    """The first sampling seed of a step: steps use disjoint seed ranges, a pure function of
    the step (so a resumed run samples what the uninterrupted one did)."""
    return seed + step * n_answers


@torch.no_grad()
def evaluate(policy, task: Task, max_new_tokens: int, stop: tuple[int, ...]) -> tuple[float, list]:
    """Greedy held-out accuracy and the answers (stop tokens removed)."""
    if not task.eval:
        return math.nan, []
    answers = sample_answers(
        policy,
        [p.prompt_ids for p in task.eval],
        1,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        stop_ids=stop,
        max_batch=min(64, len(task.eval)),
    )
    answers = [strip_stop(a, stop) for a in answers]
    correct = [task.reward(p, a) >= 1 for p, a in zip(task.eval, answers, strict=True)]
    return sum(correct) / len(correct), answers


def cold_start(policy, task: Task, cfg: GRPOConfig, pad_id: int) -> list[float]:
    """cfg.cold_start_steps supervised steps on training problems and their correct answers
    (DeepSeek-R1's "cold start"): RL only sharpens what the policy sometimes does, so a model
    that never answers correctly gets no signal from a group. Problems come from steps
    COLD_START_STEP + i of the task (never the RL steps' draws); returns the losses."""
    if task.target is None:
        raise ConfigError(f"grpo.cold_start_steps: task {task.name} has no reference answers")
    device = next(policy.parameters()).device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.cold_start_lr, weight_decay=0.0)
    policy.train()
    losses = []
    for i in tqdm(range(cfg.cold_start_steps), desc="cold start", unit="step", leave=False):
        problems = task.train(COLD_START_STEP + i)
        ids, mask = pad_rollouts(
            [p.prompt_ids for p in problems], [task.target(p) for p in problems], pad_id
        )
        ids, mask = ids.to(device), mask.to(device)
        loss = -masked_mean(token_logprobs(policy, ids), mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- driver


def run(cfg: GRPOConfig, model_dir, out_dir, base_dir: str = ".", task: Task | None = None) -> dict:
    """GRPO from the model in model_dir on cfg.task (or on `task`, a custom one); writes
    out_dir/model, metrics.jsonl, curves.png and summary.json. Returns the summary."""
    # --- setup
    t_start = time.perf_counter()
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    start_run(out_dir, "grpo", run_config(cfg, model_dir=model_dir), cfg.resume, cfg.overwrite)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy, tok = load(model_dir, device=device, trainable=True)
    ref, _ = load(model_dir, device=device, trainable=True)  # frozen: the KL anchor
    ref.requires_grad_(False)
    context = min(cfg.seq_len, policy.cfg.max_seq_len)
    if cfg.seq_len > policy.cfg.max_seq_len:
        raise ConfigError(
            f"grpo.seq_len ({cfg.seq_len}) exceeds the model's context ({policy.cfg.max_seq_len})"
        )
    if cfg.max_new_tokens >= context:
        raise ConfigError(f"grpo.max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt")
    task = task or make_task(cfg, tok, base_dir, context - cfg.max_new_tokens)
    if cfg.eval_prompts and not task.eval:
        raise ConfigError(
            f"grpo: no held-out prompts for task {task.name}; raise grpo.val_fraction "
            f"({cfg.val_fraction}) or set grpo.eval_prompts 0"
        )
    stop = stop_ids(tok)

    torch.manual_seed(cfg.seed)
    base_accuracy = None
    if cfg.cold_start_steps:  # the cold-started model is both the policy's start and the reference
        warm = out_dir / "cold_start"
        if not (warm / "model.safetensors").is_file():
            base_accuracy, _ = evaluate(policy, task, cfg.max_new_tokens, stop)
            losses = cold_start(policy, task, cfg, tok.pad_id)
            with atomic_dir(warm) as tmp:
                save_model(policy, tmp, model_source(model_dir), pad_token_id=tok.pad_id)
            write_json(
                warm / "cold_start.json", {"val_accuracy_base": base_accuracy, "losses": losses}
            )
        policy, _ = load(warm, device=device, trainable=True)
        ref, _ = load(warm, device=device, trainable=True)
        ref.requires_grad_(False)
        base_accuracy = read_json(warm / "cold_start.json", "cold start")["val_accuracy_base"]
    policy.train()
    relayout(policy)  # before the optimizer: its state takes the parameters' final strides
    optimizer = make_optimizer(policy, cfg, device)
    ckpt_root = out_dir / "checkpoints"
    state = resume_latest(ckpt_root, policy, optimizer, None, cfg.resume)
    wall_before = state.get("wall_seconds", 0.0)
    n_answers = cfg.prompts_per_step * cfg.group_size

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def save(step: int, loop_state: dict) -> None:
        save_step(
            ckpt_root, step, policy, optimizer, {"prompts": step * cfg.prompts_per_step}, None,
            cfg.keep_last, model_source(model_dir), tok.pad_id,
            extra={"wall_seconds": wall(), "log": loop_state},
        )  # fmt: skip

    last_answers: list = []
    # training problems too: what RL optimises (held-out shows whether it generalises)
    seen = {p.text: p for i in range(50) for p in task.train(PROBE_STEP + i)}
    probe = dataclasses.replace(task, eval=list(seen.values())[: cfg.eval_prompts])

    def run_eval(step: int) -> dict:
        nonlocal last_answers
        acc, last_answers = evaluate(policy, task, cfg.max_new_tokens, stop)
        train_acc, _ = evaluate(policy, probe, cfg.max_new_tokens, stop)
        return {"val_accuracy": acc, "train_accuracy": train_acc} if task.eval else {}

    def train_step(step: int) -> dict:
        seed = rollout_seed(cfg.seed, step, n_answers)
        return grpo_step(
            policy, ref, optimizer, task, task.train(step), cfg, seed, tok.pad_id, stop
        )

    done = fit(
        cfg, optimizer, train_step, run_eval, save, out_dir=out_dir, desc="grpo",
        resumed=state, device=device, eval_at_start=True,
    )  # fmt: skip
    step, interrupted = done["step"], done["interrupted"]
    if not last_answers:  # resumed at the last step: the examples need the newest answers
        _, last_answers = evaluate(policy, task, cfg.max_new_tokens, stop)

    # --- outputs
    rows = read_metrics(out_dir / "metrics.jsonl")
    evals = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
    train_rows = [r for r in rows if "reward" in r]
    first = evals[0][1] if evals else math.nan
    last = evals[-1][1] if evals else math.nan
    train_evals = [r["train_accuracy"] for r in rows if "train_accuracy" in r]
    examples = [  # the newest greedy answers to the first held-out prompts
        {"question": p.text, "reference": p.answer, "answer": tok.decode(a)}
        for p, a in zip(task.eval[:8], last_answers[:8])
    ]
    seconds = wall()
    headline = (
        f"held-out accuracy {first:.2f} -> {last:.2f} ({len(task.eval)} prompts, greedy) "
        f"in {step} steps ({seconds / 60:.1f} min)"
    )
    if train_evals:
        headline += f"; on training problems {train_evals[0]:.2f} -> {train_evals[-1]:.2f}"
    if base_accuracy is not None:
        headline += f"; {base_accuracy:.2f} before the {cfg.cold_start_steps}-step cold start"
    summary = {
        "headline": headline,
        "step": step,
        "max_steps": cfg.max_steps,
        "interrupted": interrupted,
        "task": task.name,
        "task_info": task.info,
        "eval_prompts": len(task.eval),
        "cold_start_steps": cfg.cold_start_steps,
        "val_accuracy_base": base_accuracy,  # before the cold start (None without one)
        "val_accuracy_start": first,
        "val_accuracy": last,
        "val_curve": evals,
        "train_accuracy_start": train_evals[0] if train_evals else math.nan,
        "train_accuracy": train_evals[-1] if train_evals else math.nan,
        "reward_start": train_rows[0]["reward"] if train_rows else math.nan,
        "reward_end": train_rows[-1]["reward"] if train_rows else math.nan,
        "examples": examples,
        "params": num_params(policy),
        "wall_seconds": seconds,
        "s_per_step": (
            sorted(r["s_per_step"] for r in train_rows)[len(train_rows) // 2]
            if train_rows
            else math.nan
        ),
        "train_seconds": done["train_seconds"],
        "peak_memory_mb": done["peak_memory_mb"],
        "device": str(device),
        "base_model": str(model_dir),
    }
    if device.type == "cuda":
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not interrupted:
        with atomic_dir(out_dir / "model") as tmp:
            save_model(policy, tmp, model_source(model_dir), pad_token_id=tok.pad_id)
        keys = ["reward", "val_accuracy", "train_accuracy", "kl", "groups_with_signal"]
        plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png", keys, f"GRPO ({task.name})")
    write_json(out_dir / "summary.json", summary)
    return summary
