"""RLHF with PPO (`lmforge ppo`): the policy answers prompts, a reward model (or a checker of
reference answers) scores the answers, and PPO makes better-than-expected tokens more likely
while a KL penalty holds the policy near the model it started from (Ziegler et al. 2019,
arXiv:1909.08593; InstructGPT, arXiv:2203.02155; the recipe of TRL's PPOTrainer).

The one idea: the reward model scores a whole answer, but PPO wants a reward per token. Every
answer token gets -kl_coef * (log pi - log ref), the penalty that keeps the policy from drifting
into text the reward model never saw, and the last token also gets the score. A value head on
the policy's final hidden states predicts the return from each token on; GAE turns rewards and
values into advantages, and the clipped objective takes several small steps on each rollout
batch without moving far from the policy that sampled it.

Each step: sample one answer per prompt (the inference engine, seeded by the step, so a resumed
run draws the same answers), score it, recompute log-probs under the policy and the frozen
reference and the values (one padded forward each), GAE, then `ppo_epochs` shuffled passes of
minibatches. The reward `qa` replaces the reward model with `qa_check`: a correct answer beats
an abstention ("I don't know"), which beats a wrong one, so a model learns to abstain rather
than make something up.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.align.preference import answer_ids, parse_message, plot_curves, prompt_ids, row_to_pair
from lmforge.align.reward import load_reward_model, score_ids
from lmforge.align.rollout import kl_k3, masked_mean, pad_rollouts, sample_answers, token_logprobs
from lmforge.config import ConfigError, PPOConfig, PreferenceSourceConfig, resolve_path
from lmforge.data.readers import DataError, is_val, read_jsonl
from lmforge.infer.chat import stop_ids
from lmforge.infer.cpu_decode import relayout
from lmforge.io import atomic_dir, write_json
from lmforge.model.checkpoint import save_model
from lmforge.model.load import load, model_source
from lmforge.model.transformer import num_params
from lmforge.perf import autocast, pick_device
from lmforge.tasks.qa import UNANSWERABLE, qa_check, qa_reference, qa_reward
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import resume_latest, save_step
from lmforge.train.loop import fit
from lmforge.train.metrics import MetricsLog, read_metrics
from lmforge.train.optim import make_optimizer
from lmforge.train.run_dir import run_config, start_run

# --------------------------------------------------------------------------- the math


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """x scaled to unit variance over the True positions of mask (and moved to zero mean unless
    shift_mean is False); positions outside the mask become 0."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * m


def per_token_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both (N, T-1) over targets: kl = log pi - log ref at answer tokens (the
    sampled estimate of KL(pi || ref), 0 elsewhere), rewards = -kl_coef * kl plus each row's
    score (N,) at its last answer token."""
    kl = (logp - ref_logp) * mask.to(logp.dtype)
    rewards = -kl_coef * kl
    # the last True of each row: the first True of the flipped row (argmax returns the first max)
    last = mask.shape[1] - 1 - mask.flip(1).to(torch.int64).argmax(1)
    rewards[torch.arange(mask.shape[0]), last] += score.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438) over each row's
    answer tokens, (N, T-1) each: delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last
    answer token, A_t = delta_t + gamma lam A_{t+1}; returns = A + V. Zero outside the mask.
    Rewards and values outside the mask are ignored: the answer is one contiguous span per row
    and everything after it is 0, so the recursion starts at 0 at each answer's end."""
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * m
    return advantages, (advantages + values) * m


def ppo_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    value_clip: float,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(policy loss, value loss, stats): token means over mask of the clipped surrogate
    max(-A r, -A clip(r, 1 +- clip_range)) with r = pi / pi_old, and of the clipped value loss
    0.5 max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, +- value_clip)
    (value_clip 0 = unclipped). stats (detached): clipfrac, vf_clipfrac, and approx_kl, the k3
    estimate of KL(pi_old || pi) from the rollout's samples."""
    # padding gets ratio 1: its log-probs are arbitrary and exp() of them can overflow to inf,
    # and inf * 0 is nan in the masked mean
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    vf = (values - returns) ** 2
    if value_clip > 0:
        v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        vf = torch.max(vf, (v_clipped - returns) ** 2)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_range).float(), mask),
            "vf_clipfrac": masked_mean(((values - old_values).abs() > value_clip).float(), mask)
            if value_clip > 0
            else torch.zeros(()),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),  # k3 with the ratio
        }
    return masked_mean(pg, mask), masked_mean(0.5 * vf, mask), stats


class AdaptiveKL:
    """The KL coefficient of Ziegler et al. 2019 (section 2.2): after each batch of n answers
    with mean KL `kl` (nats per answer), coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n /
    horizon, so it grows while the policy is further from the reference than the target and
    shrinks while it is closer."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
        return self.value


# --------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    messages: list[dict]  # the conversation so far, ending with a user turn
    answer: str | None = None  # reward: qa, the reference answer


def _prompt_messages(value, field: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"field {field!r} is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                raise ValueError(f"{field}[{i}] must be a message object")
        return [parse_message(m, f"{field}[{i}]") for i, m in enumerate(value)]
    raise ValueError(f"field {field!r} must be a string or a non-empty list of messages")


def row_to_prompt(row, reward: str = "model", system_prompt: str = "") -> Prompt:
    """One JSONL row -> a Prompt. reward "model": a preference row in any layout row_to_pair
    reads (its prompt is kept, its answers ignored) or a row with just `prompt` (a string or a
    messages list). reward "qa": `question` (or `prompt`) and `answer` (a string or a number;
    GSM8K's "...#### 42" keeps what follows the last ####). Raises ValueError naming the field."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    answer = None
    if reward == "qa":
        key = "prompt" if "prompt" in row and "question" not in row else "question"
        if key not in row or "answer" not in row:
            raise ValueError(
                f"missing field {key if key not in row else 'answer'!r} "
                "(a qa row needs 'question' (or 'prompt') and 'answer')"
            )
        messages = _prompt_messages(row[key], key)
        answer = qa_reference(row["answer"])
    elif "chosen" in row or "rejected" in row:
        messages = row_to_pair(row).prompt
    elif "prompt" in row:
        messages = _prompt_messages(row["prompt"], "prompt")
    else:
        raise ValueError("a row needs 'prompt', or 'chosen' and 'rejected' (a preference pair)")
    if messages[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return Prompt(messages, answer)


def read_prompts(
    src: PreferenceSourceConfig,
    base_dir: str,
    reward: str = "model",
    system_prompt: str = "",
    skip_bad_rows: bool = False,
) -> tuple[list[Prompt], list[str]]:
    """(prompts, problems) of one JSONL file; a bad row is a DataError naming file and line
    unless skip_bad_rows, which lists it in problems and goes on."""
    path = resolve_path(src.path, base_dir)
    if not path.is_file():
        raise DataError(f"ppo source {src.name!r}: file not found: {path}")
    prompts, problems = read_jsonl(
        path, lambda row: row_to_prompt(row, reward, system_prompt), skip_bad_rows, src.max_rows
    )
    if not prompts:
        raise DataError(f"ppo source {src.name!r}: {path} has no usable rows")
    return prompts, problems


def build_prompts(
    cfg: PPOConfig, tok: Tokenizer, base_dir: str, max_prompt_len: int
) -> tuple[list, list, dict]:
    """Train and held-out (prompt ids, Prompt) of every source, and counts for the summary.
    A repeated prompt is kept once; a prompt is held out by a hash of its messages; a long one
    keeps its last max_prompt_len tokens."""
    if not cfg.sources:
        raise ConfigError("ppo.sources is empty: name at least one JSONL file of prompts")
    train, val, stats = [], [], {"sources": {}, "problems": []}
    seen: set[str] = set()
    for src in cfg.sources:
        prompts, problems = read_prompts(
            src, base_dir, cfg.reward, cfg.system_prompt, cfg.skip_bad_rows
        )
        stats["problems"] += problems
        s = {"rows": len(prompts), "bad_rows": len(problems), "duplicates": 0, "truncated": 0}
        s.update(train=0, val=0)
        for p in prompts:
            key = json.dumps(p.messages, ensure_ascii=False)
            if key in seen:
                s["duplicates"] += 1
                continue
            seen.add(key)
            ids = prompt_ids(tok, p.messages)
            if len(ids) > max_prompt_len:
                ids, s["truncated"] = ids[-max_prompt_len:], s["truncated"] + 1
            held_out = is_val(key, cfg.val_fraction)
            (val if held_out else train).append((ids, p))
            s["val" if held_out else "train"] += 1
        stats["sources"][src.name] = s
    if not train:
        raise ConfigError("ppo: no training prompts left (all held out or duplicates)")
    return train, val, stats


def outcome_shares(outcomes: list[str], prompts: list[Prompt], prefix: str = "") -> dict:
    """The share of qa outcomes correct / abstain / wrong over all prompts, and when some
    prompts are UNANSWERABLE, the two kinds apart: answerable_* over the answerable ones and
    unanswerable_abstain (their "correct") over the rest, so an abstention that was right can
    be told from an answer that was."""
    out = {
        f"{prefix}{k}": outcomes.count(k) / len(outcomes) for k in ("correct", "abstain", "wrong")
    }
    una = [o for o, p in zip(outcomes, prompts) if p.answer == UNANSWERABLE]
    ans = [o for o, p in zip(outcomes, prompts) if p.answer != UNANSWERABLE]
    if una:
        out[f"{prefix}unanswerable_abstain"] = una.count("correct") / len(una)
        for k in ("correct", "abstain", "wrong") if ans else ():
            out[f"{prefix}answerable_{k}"] = ans.count(k) / len(ans)
    return out


def prompt_plan(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """Indices of the prompts of rollout batch `step`: seeded permutations of the n prompts laid
    end to end, read per_step at a time (a pure function of the step, for resuming)."""
    out: list[int] = []
    while len(out) < per_step:
        epoch, i = divmod(step * per_step + len(out), n)
        take = min(per_step - len(out), n - i)
        out += np.random.default_rng([seed, epoch]).permutation(n)[i : i + take].tolist()
    return out


# --------------------------------------------------------------------------- scoring


def turn_suffix(tok: Tokenizer, stops: tuple[int, ...]) -> tuple[int | None, list[int]]:
    """(end-of-turn id, the tokens the chat template writes after it): ChatML ends a reply with
    "<|im_end|>\\n". The reward model learned on replies as the template renders them and reads
    its score at their last token, so a sampled answer that stopped on the marker gets the same
    tail before it is scored (the policy never generates it)."""
    if not tok.chat_template:
        return None, []
    reply = answer_ids(tok, [{"role": "user", "content": "Hi."}], "Hello.")
    ends = [i for i, t in enumerate(reply) if t in stops]
    return (reply[ends[-1]], reply[ends[-1] + 1 :]) if ends else (None, [])


def check_reward_model(rm, rm_tok: Tokenizer, tok: Tokenizer, path: Path, seq_len: int) -> None:
    probe = "Reward models and policies must share a tokenizer. 奖励模型。"
    if rm_tok.vocab_size != tok.vocab_size or rm_tok.encode(probe) != tok.encode(probe):
        raise ConfigError(
            f"reward model {path} uses a different tokenizer from the policy: PPO scores the "
            "policy's token ids directly, so train the reward model from this policy's model"
        )
    if rm.cfg.max_seq_len < seq_len:
        raise ConfigError(
            f"ppo.seq_len ({seq_len}) exceeds the reward model's context ({rm.cfg.max_seq_len})"
        )


def logprobs_and_values(
    policy, value_head: nn.Module, ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(ids[:, t+1] | ids[:, :t+1]) and the value of that state, (N, T-1) each, from one
    pass of the shared backbone: the value at t reads the hidden state the logits of t+1 do."""
    h = policy.features(ids[:, :-1])  # (N, T-1, dim)
    logp = token_logprobs(lambda _: policy.lm_head(h), ids, temperature)
    return logp, value_head(h).squeeze(-1).float()


# --------------------------------------------------------------------------- driver

EVAL_SEED = 1_000_000_007  # held-out sampling seeds start here, far from the rollouts' seed + step


@torch.no_grad()
def forward_chunks(policy, value_head, ref, ids: torch.Tensor, cfg: PPOConfig, device):
    """Policy log-probs, values and reference log-probs of a padded batch, (N, T-1) each, on
    the CPU, computed cfg.batch_size rows at a time."""
    parts = []
    for i in range(0, ids.shape[0], cfg.batch_size):
        x = ids[i : i + cfg.batch_size].to(device)
        with autocast(device):
            logp, values = logprobs_and_values(policy, value_head, x, cfg.temperature)
            ref_logp = token_logprobs(ref, x, cfg.temperature)
        parts.append((logp.float(), values.float(), ref_logp.float()))
    return tuple(torch.cat(p).cpu() for p in zip(*parts))


def ppo_update(policy, value_head, optimizer, ro: dict, cfg: PPOConfig, step: int, device) -> dict:
    """ppo_epochs shuffled passes over the rollout batch `ro` in minibatches; stops early when
    the policy has moved more than early_stop_kl from the one that sampled the batch. Returns
    the updates' mean losses and statistics, and the epochs run."""
    params = [p for m in (policy, value_head) for p in m.parameters() if p.requires_grad]
    n = ro["ids"].shape[0]
    rng = np.random.default_rng([cfg.seed, step])
    sums, updates, epochs = {}, 0, 0
    for _ in range(cfg.ppo_epochs):
        epochs += 1
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, cfg.minibatch_size):
            mb = order[start : start + cfg.minibatch_size]
            T = int(ro["lengths"][mb].max())  # trim the minibatch's own padding
            x = ro["ids"][mb, :T].to(device)
            old = {k: ro[k][mb, : T - 1].to(device) for k in ro if k not in ("ids", "lengths")}
            with autocast(device):
                logp, values = logprobs_and_values(policy, value_head, x, cfg.temperature)
            pg_loss, vf_loss, st = ppo_losses(
                logp, old["logp"], values, old["values"], old["advantages"], old["returns"],
                old["mask"], cfg.clip_range, cfg.value_clip,
            )  # fmt: skip
            (pg_loss + cfg.vf_coef * vf_loss).backward()
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"pg_loss": pg_loss, "vf_loss": vf_loss, "grad_norm": grad_norm, **st}
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            updates += 1
            if cfg.early_stop_kl and st["approx_kl"].item() > cfg.early_stop_kl:
                break
        else:
            continue
        break  # the inner loop stopped early: skip the remaining epochs too
    return {**{k: v / updates for k, v in sums.items()}, "epochs": epochs}


def run(cfg: PPOConfig, model_dir, out_dir, base_dir: str = ".") -> dict:
    """PPO from the model in model_dir (usually the SFT model, or a LoRA adapter, merged);
    writes out_dir/model, metrics.jsonl, samples.jsonl, curves.png and summary.json, with step
    checkpoints under out_dir/checkpoints. Returns the summary."""
    # --- setup
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    start_run(out_dir, "ppo", run_config(cfg, model_dir=model_dir), cfg.resume, cfg.overwrite)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy, tok = load(model_dir, device=device, trainable=True)
    ref, _ = load(model_dir, device=device, trainable=True)
    ref.requires_grad_(False)
    tok_dir = model_source(model_dir)
    if cfg.seq_len > policy.cfg.max_seq_len:
        raise ConfigError(
            f"ppo.seq_len ({cfg.seq_len}) exceeds the model's context ({policy.cfg.max_seq_len})"
        )
    stops = stop_ids(tok)
    end_of_turn, suffix = turn_suffix(tok, stops)
    rm = rm_path = None
    if cfg.reward == "model":
        if not cfg.reward_model:
            raise ConfigError("ppo.reward is 'model' but ppo.reward_model names no directory")
        rm_path = resolve_path(cfg.reward_model, base_dir)
        rm, rm_tok = load_reward_model(rm_path, device)
        rm.requires_grad_(False)
        check_reward_model(rm, rm_tok, tok, rm_path, cfg.seq_len)
    # an answer is at most max_new_tokens plus its stop token, and the scorer adds the suffix
    max_prompt_len = cfg.seq_len - cfg.max_new_tokens - 1 - len(suffix)
    if max_prompt_len < 1:
        raise ConfigError(
            f"ppo.seq_len ({cfg.seq_len}) leaves no room for a prompt after "
            f"max_new_tokens ({cfg.max_new_tokens}) answer tokens"
        )
    train, val, stats = build_prompts(cfg, tok, base_dir, max_prompt_len)
    for p in stats["problems"][:5]:
        tqdm.write(f"skipped {p}", file=sys.stderr)
    # evenly spaced through the held-out prompts, so every source is in proportion
    picked = np.linspace(0, len(val), min(cfg.eval_prompts, len(val)), endpoint=False)
    evals = [val[int(i)] for i in picked]

    torch.manual_seed(cfg.seed)
    # values start at 0: the head adds nothing to the first updates but what the returns teach
    value_head = nn.Linear(policy.cfg.dim, 1).to(device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    # the engine's weight layout, before the optimizer sees the parameters; the reference gets
    # it too, so both compute alike and the KL of the first step is exactly 0
    relayout(policy)
    relayout(ref)
    trainable = nn.ModuleDict({"policy": policy, "value_head": value_head})
    optimizer = make_optimizer(trainable, cfg, device)
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    ckpt_root = out_dir / "checkpoints"
    heads = {"value_head": value_head}  # rides along in every checkpoint
    state = resume_latest(ckpt_root, policy, optimizer, None, cfg.resume, modules=heads)
    kl_ctl.value = state.get("kl_coef", kl_ctl.value)
    samples_log = MetricsLog(out_dir / "samples.jsonl", resume_step=state.get("step"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def checkpoint(step: int, loop_state: dict) -> None:
        save_step(
            ckpt_root, step, policy, optimizer, {"rollouts": step * cfg.prompts_per_step}, None,
            cfg.keep_last, tok_dir, tok.pad_id, modules=heads,
            extra={"kl_coef": kl_ctl.value, "log": loop_state},
        )  # fmt: skip

    def sample(prompts: list[list[int]], seed: int, greedy: bool = False) -> list[list[int]]:
        return sample_answers(
            policy,
            prompts,
            1,
            max_new_tokens=cfg.max_new_tokens,
            temperature=0.0 if greedy else cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            stop_ids=stops,
            seed=seed,
            max_batch=min(32, len(prompts)),
        )

    @torch.no_grad()
    def score(batch: list, answers: list[list[int]]) -> tuple[torch.Tensor, list[str]]:
        """Each answer's score (N,) and, for reward qa, its outcome."""
        if cfg.reward == "qa":
            texts = [tok.decode(t for t in a if t not in stops) for a in answers]
            outcomes = [qa_check(t, p.answer) for t, (_, p) in zip(texts, batch)]
            return torch.tensor([qa_reward(o, cfg) for o in outcomes]), outcomes
        tails = [a + suffix if a and a[-1] == end_of_turn else a for a in answers]
        out = []
        for i in range(0, len(batch), cfg.batch_size):
            prompts = [ids for ids, _ in batch[i : i + cfg.batch_size]]
            with autocast(device):
                out += score_ids(rm, prompts, tails[i : i + cfg.batch_size], tok.pad_id, device)
        return torch.tensor(out), []

    def evaluate(at_step: int) -> dict:
        """Greedy answers to the held-out prompts: mean reward (qa: the share correct, abstained
        and wrong); and KL(pi || ref) per answer, from sampled answers (greedy ones are not
        samples of pi)."""
        if not evals:
            return {}
        prompts = [ids for ids, _ in evals]
        answers = sample(prompts, 0, greedy=True)
        scores, outcomes = score(evals, answers)
        result = {"val_reward": scores.mean().item()}
        result["val_answer_len"] = float(np.mean([len(a) for a in answers]))
        if outcomes:
            result |= outcome_shares(outcomes, [p for _, p in evals], "val_")
        drawn = sample(prompts, EVAL_SEED + cfg.seed)  # the same draws at every evaluation
        ids, mask = pad_rollouts(prompts, drawn, tok.pad_id)
        logp, _, ref_logp = forward_chunks(policy, value_head, ref, ids, cfg, device)
        result["val_kl"] = ((logp - ref_logp) * mask).sum(1).mean().item()
        for (_, p), a, s in list(zip(evals, answers, scores.tolist()))[:4]:
            prompt = p.messages[-1]["content"]
            samples_log.write(step=at_step, prompt=prompt, answer=tok.decode(a), reward=s)
        return result

    def train_step(step: int) -> dict:
        """Rollout (sample, score, the per-token numbers the update starts from), then the
        PPO update on it."""
        batch = [train[i] for i in prompt_plan(len(train), cfg.prompts_per_step, cfg.seed, step)]
        prompts = [ids for ids, _ in batch]
        answers = sample(prompts, cfg.seed + step * cfg.prompts_per_step)
        scores, outcomes = score(batch, answers)
        ids, mask = pad_rollouts(prompts, answers, tok.pad_id)
        logp, values, ref_logp = forward_chunks(policy, value_head, ref, ids, cfg, device)
        if cfg.whiten_rewards:  # the batch's scores to mean 0, std 1: a scale-free reward
            shaped = whiten(scores, torch.ones_like(scores, dtype=torch.bool))
        else:
            shaped = scores
        rewards, kl = per_token_rewards(shaped, logp, ref_logp, mask, kl_ctl.value)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        rollout = {
            "ids": ids,
            "lengths": torch.tensor([len(p) + len(a) for p, a in zip(prompts, answers)]),
            "mask": mask,
            "logp": logp,
            "values": values,
            "advantages": whiten(advantages, mask),
            "returns": returns,
        }
        update = ppo_update(policy, value_head, optimizer, rollout, cfg, step, device)
        kl_per_answer = kl.sum(1).mean().item()
        row = {
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "kl": kl_per_answer,
            "kl_k3": torch.where(mask, kl_k3(logp, ref_logp), 0.0).sum(1).mean().item(),
            "kl_coef": kl_ctl.value,
            "entropy": -masked_mean(logp, mask).item(),  # sampled tokens' mean -log pi
            "answer_len": float(mask.sum(1).float().mean()),
            "stopped": float(np.mean([bool(a) and a[-1] in stops for a in answers])),
            "value_mean": masked_mean(values, mask).item(),
            **update,
        }
        if outcomes:
            row |= outcome_shares(outcomes, [p for _, p in batch])
        if cfg.adaptive_kl:
            kl_ctl.update(kl_per_answer, len(answers))
        return row

    done = fit(
        cfg, optimizer, train_step, evaluate, checkpoint, out_dir=out_dir, desc="ppo",
        resumed=state, device=device, eval_at_start=True,
    )  # fmt: skip
    step, interrupted = done["step"], done["interrupted"]

    # --- outputs
    # from the log, so a resumed (or re-run finished) stage reports the whole run
    rows = read_metrics(out_dir / "metrics.jsonl")
    logged = [r for r in rows if "val_reward" in r]
    before = {k: v for k, v in logged[0].items() if k != "step"} if logged else {}
    after = {k: v for k, v in logged[-1].items() if k != "step"} if logged else {}
    trained = [r for r in rows if "kl" in r]
    summary = {
        "step": step,
        "max_steps": cfg.max_steps,
        "interrupted": interrupted,
        "rollouts": step * cfg.prompts_per_step,
        "reward": cfg.reward,
        "reward_model": str(rm_path) if rm_path else None,
        "params": num_params(policy),
        "prompts": {"train": len(train), "val": len(val), "eval": len(evals)},
        "data": stats["sources"],
        "bad_rows": len(stats["problems"]),
        "before": before,
        "after": after,
        "kl_coef": kl_ctl.value,
        "train_kl": trained[-1]["kl"] if trained else math.nan,
        "train_seconds": done["train_seconds"],
        "peak_memory_mb": done["peak_memory_mb"],
        "device": str(device),
        "base_model": str(model_dir),
    }
    if device.type == "cuda":
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary["headline"] = _headline(before, after, len(evals), step, out_dir / "model")
    if interrupted:
        summary["headline"] = f"interrupted at step {step} of {cfg.max_steps} (rerun to resume)"
    if not interrupted:
        with atomic_dir(out_dir / "model") as tmp:
            save_model(policy, tmp, tok_dir, pad_token_id=tok.pad_id)
        keys = ["reward", "kl", "kl_coef", "vf_loss", "val_reward", "val_kl"]
        keys += ["val_correct", "val_abstain", "val_wrong"] if cfg.reward == "qa" else []
        plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png", keys, "PPO")
    write_json(out_dir / "summary.json", summary)
    return summary


def _headline(before: dict, after: dict, n_eval: int, step: int, model_path: Path) -> str:
    if not after:
        return f"{step} steps (no held-out prompts to evaluate); model in {model_path}"
    b = lambda k: f"{before[k]:.3f} -> " if k in before else ""  # noqa: E731
    parts = [f"held-out reward {b('val_reward')}{after['val_reward']:.3f}"]
    if "val_correct" in after:
        parts += [f"{k} {b('val_' + k)}{after['val_' + k]:.2f}" for k in ("correct", "abstain")]
    return (
        f"{', '.join(parts)} (greedy, {n_eval} prompts), KL to the reference "
        f"{after['val_kl']:.2f} nats per answer after {step} steps; model in {model_path}"
    )
