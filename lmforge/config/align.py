"""The alignment sections: `sft:`, its LoRA adapters, and the preference and RL stages
(`reward:`, `dpo:`, `ppo:`, `grpo:`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config.base import (
    ConfigError,
    build,
    check_choice,
    check_positive,
    section_name,
    warn_deprecated,
)
from lmforge.config.train import TrainLoopConfig

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoRAConfig:  # `sft.lora`, `dpo.lora`: low-rank adapters (r = 0: train every weight)
    r: int = 0  # adapter rank (0 = no LoRA: full fine-tuning)
    alpha: float = 16.0  # scaling numerator: adapter output is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input during training
    targets: list[str] = field(
        default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"]
    )  # projections that get adapters: q k v o gate up down

    def __post_init__(self):
        if self.r < 0:
            raise ConfigError(f"lora.r must be >= 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(
                f"lora.targets: unknown projection {bad[0]!r}; choose from {', '.join(LORA_TARGETS)}"
            )
        if self.r and not self.targets:
            raise ConfigError("lora.targets is empty; name at least one projection")


def as_lora(value, where: str) -> LoRAConfig:
    """A stage's `lora:` sub-section as given (a LoRAConfig, or a mapping from YAML)."""
    return value if isinstance(value, LoRAConfig) else build(LoRAConfig, value, where)


@dataclass
class FileSourceConfig:  # a named JSONL file of training rows (base of the stage sources; not a section)
    name: str = ""  # short name used in reports
    path: str = ""  # JSONL file (gzip allowed)
    max_rows: int = 0  # read at most this many rows (0 = all)

    def __post_init__(self):
        what = {SFTSourceConfig: "sft source"}.get(type(self), "preference source")
        if not self.name:
            self.name = Path(self.path).name.split(".")[0] or "source"
        if not self.path:
            raise ConfigError(f"{what} {self.name!r}: 'path' is required")
        if self.max_rows < 0:
            raise ConfigError(f"{what} {self.name!r}: max_rows must be >= 0")


@dataclass
class SFTSourceConfig(FileSourceConfig):  # one entry of `sft.sources`
    path: str = ""  # JSONL file: instruction/input/output rows or OpenAI-style `messages` lists
    weight: float = 1.0  # epochs of this source per pass (0.5 = half its rows, 2 = twice)

    def __post_init__(self):
        super().__post_init__()
        if self.weight < 0:
            raise ConfigError(f"sft source {self.name!r}: weight must be >= 0, got {self.weight}")


@dataclass
class SFTConfig(TrainLoopConfig):  # `sft:` supervised fine-tuning on instruction data (lmforge sft)
    max_steps: int = 200  # optimizer steps
    batch_size: int = 8  # conversations per micro-batch (padded to the longest)
    seq_len: int = 256  # longest conversation in tokens (at most model.max_seq_len)
    lr: float = 1e-3  # peak learning rate (LoRA usually wants more than full fine-tuning)
    warmup_steps: int = 20  # linear warmup from 0 to the peak
    eval_every: int = 50  # held-out loss every N steps (0 = only at the end)
    seed: int = 1337  # seeds data order and LoRA initialisation
    sources: list[SFTSourceConfig] = field(default_factory=list)  # instruction data (JSONL)
    system_prompt: str = ""  # system message put before conversations that have none ("" = none)
    val_fraction: float = 0.05  # share of conversations held out, by text hash
    overflow: str = "truncate"  # a conversation longer than seq_len: truncate | drop
    skip_bad_rows: bool = False  # count and skip malformed rows instead of stopping at the first
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters (lora.r 0 = full fine-tuning)

    def __post_init__(self):
        super().__post_init__()
        self.lora = as_lora(self.lora, "sft.lora")
        self.sources = [
            s if isinstance(s, SFTSourceConfig) else build(SFTSourceConfig, s, "sft.sources")
            for s in self.sources
        ]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"sft.sources: duplicate source names {names}")
        check_choice(self, "overflow", ("truncate", "drop"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"sft.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class PreferenceSourceConfig(
    FileSourceConfig
):  # one entry of `reward.sources`, `dpo.sources` or `ppo.sources`
    path: str = ""  # JSONL of pairs: HH-RLHF dialogues, ShareGPT, or prompt/chosen/rejected


@dataclass
class PreferenceDataConfig(TrainLoopConfig):  # preference-pair data (not a section)
    sources: list[PreferenceSourceConfig] = field(default_factory=list)  # preference pairs (JSONL)
    system_prompt: str = ""  # system message put before prompts that have none ("" = none)
    val_fraction: float = 0.1  # share of pairs held out, by a hash of the prompt
    max_prompt_len: int = (
        128  # a longer prompt keeps its last this-many tokens (answers are cut to fit seq_len)
    )
    skip_bad_rows: bool = False  # count and skip malformed pairs instead of stopping at the first

    def __post_init__(self):
        super().__post_init__()
        where = section_name(type(self))
        self.sources = [
            s
            if isinstance(s, PreferenceSourceConfig)
            else build(PreferenceSourceConfig, s, f"{where}.sources")
            for s in self.sources
        ]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.sources: duplicate source names {names}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{where}.val_fraction must be in [0, 1), got {self.val_fraction}")
        check_positive(self, "max_prompt_len")
        if self.max_prompt_len >= self.seq_len:
            raise ConfigError(
                f"{where}.max_prompt_len ({self.max_prompt_len}) must be below seq_len ({self.seq_len}) "
                "so that some answer fits"
            )


@dataclass
class RewardConfig(
    PreferenceDataConfig
):  # `reward:` a reward model from preference pairs (lmforge reward)
    lr: float = 1e-4  # peak learning rate
    max_steps: int = 200  # optimizer steps
    center_rewards: float = (
        0.0  # weight of a penalty on (r_chosen + r_rejected)^2, keeping scores near 0
    )


@dataclass
class DPOConfig(PreferenceDataConfig):  # `dpo:` direct preference optimisation (lmforge dpo)
    lr: float = 1e-5  # peak learning rate (DPO wants a small one for full fine-tuning)
    beta: float = 0.1  # strength of the implicit KL to the reference: higher stays closer
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo (IPO: squared distance to 1 / (2 beta))
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels (sigmoid only)
    sft_weight: float = (
        0.0  # add this times the chosen answers' per-token NLL (RPO); keeps answers well formed
    )
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters (lora.r 0 = full fine-tuning)
    lora_r: int = 0  # deprecated spelling of lora.r (--lora.r N), read for one more release
    judge: str = ""  # reward-model directory: score policy vs reference answers on held-out prompts
    judge_prompts: int = 64  # held-out prompts answered by both models for the judge's win rate
    judge_max_new_tokens: int = 64  # answer length for the win rate (greedy)

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "loss", ("sigmoid", "ipo"))
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.lora_r < 0 or self.judge_prompts < 0 or self.sft_weight < 0:
            raise ConfigError("dpo.lora_r, dpo.judge_prompts and dpo.sft_weight must be >= 0")
        self.lora = as_lora(self.lora, "dpo.lora")
        if self.lora_r:  # the old spelling: moved into lora.r, so that only one is read
            if self.lora.r not in (0, self.lora_r):
                raise ConfigError(
                    f"dpo.lora_r ({self.lora_r}) and dpo.lora.r ({self.lora.r}) disagree; "
                    "dpo.lora_r is the old spelling: give dpo.lora.r only"
                )
            warn_deprecated("dpo.lora_r (--lora_r)", "dpo.lora.r (lmforge dpo --lora.r N)")
            self.lora = dataclasses.replace(self.lora, r=self.lora_r)
            self.lora_r = 0


@dataclass
class RolloutConfig(TrainLoopConfig):  # sampling answers from the policy (not a section)
    prompts_per_step: int = 8  # prompts per rollout batch (one optimizer phase per batch)
    max_new_tokens: int = 32  # answer length limit in a rollout
    temperature: float = 1.0  # rollout sampling temperature (1 = the policy's own distribution)
    top_k: int = 0  # rollout top-k (0 = off: the policy gradient assumes unfiltered samples)
    top_p: float = 1.0  # rollout nucleus threshold (1 = off)
    kl_coef: float = 0.05  # weight of the KL penalty to the frozen reference model
    clip_range: float = 0.2  # PPO ratio clip: the update keeps pi/pi_old within 1 +- this
    eval_prompts: int = 64  # held-out prompts scored at each evaluation (greedy)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "prompts_per_step", "max_new_tokens", "clip_range")
        if self.temperature <= 0 or self.kl_coef < 0 or self.eval_prompts < 0:
            raise ConfigError(
                f"{section_name(type(self))}: temperature must be > 0, kl_coef and eval_prompts >= 0"
            )


@dataclass
class PPOConfig(RolloutConfig):  # `ppo:` RLHF with PPO against a reward model (lmforge ppo)
    sources: list[PreferenceSourceConfig] = field(
        default_factory=list
    )  # prompts: preference pairs' prompts, or rows with prompt/messages (+ answer for reward: qa)
    reward: str = (
        "model"  # model (a reward model, --reward_model) | qa (checker: correct > abstain > wrong)
    )
    reward_model: str = ""  # reward-model directory (lmforge reward) for reward: model
    correct_reward: float = 1.0  # reward: qa, an answer that contains the reference answer
    abstain_reward: float = 0.0  # reward: qa, an answer that says it does not know
    wrong_reward: float = -1.0  # reward: qa, any other answer
    lr: float = 1e-5  # peak learning rate
    batch_size: int = 8  # rows per no-grad forward pass (scores, reference log-probs)
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatch_size: int = 4  # rollouts per gradient step inside an epoch
    vf_coef: float = 0.1  # weight of the value loss
    value_clip: float = 0.2  # clip value predictions to old value +- this (0 = off)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    adaptive_kl: bool = True  # adapt kl_coef towards target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # adaptive KL target (nats per answer)
    kl_horizon: int = 10000  # adaptive KL horizon (answers)
    whiten_rewards: bool = True  # normalise scores over the rollout batch before the KL penalty
    early_stop_kl: float = 0.0  # stop a batch's epochs when the approximate KL to the rollout policy exceeds this (0 = off)
    system_prompt: str = ""  # system message put before prompts that have none ("" = none)
    val_fraction: float = 0.1  # share of prompts held out for evaluation, by hash
    skip_bad_rows: bool = False  # count and skip malformed rows instead of stopping at the first

    def __post_init__(self):
        super().__post_init__()
        self.sources = [
            s
            if isinstance(s, PreferenceSourceConfig)
            else build(PreferenceSourceConfig, s, "ppo.sources")
            for s in self.sources
        ]
        check_choice(self, "reward", ("model", "qa"))
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"ppo.sources: duplicate source names {names}")
        check_positive(self, "ppo_epochs", "minibatch_size", "target_kl", "kl_horizon")
        for name in ("vf_coef", "value_clip", "early_stop_kl"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ppo.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"ppo.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_new_tokens >= self.seq_len:
            raise ConfigError(
                f"ppo.max_new_tokens ({self.max_new_tokens}) must be below seq_len "
                f"({self.seq_len}) so that a prompt fits"
            )
        if not 0.0 < self.lam <= 1.0 or not 0.0 < self.gamma <= 1.0:
            raise ConfigError("ppo.lam and ppo.gamma must be in (0, 1]")
        if not self.correct_reward > self.abstain_reward > self.wrong_reward:
            raise ConfigError(
                "ppo: qa rewards must order correct_reward > abstain_reward > wrong_reward"
            )


@dataclass
class GRPOConfig(
    RolloutConfig
):  # `grpo:` group-relative policy optimisation with verifiable rewards (lmforge grpo)
    task: str = (
        "arithmetic"  # arithmetic (built in, exact match) | gsm8k (a JSONL of question/answer rows)
    )
    path: str = ""  # gsm8k: JSONL file with question and answer ("#### 42" at the end)
    digits: int = 1  # arithmetic: operands have 1..digits digits
    ops: str = "+"  # arithmetic: operators to draw from, e.g. "+-"
    group_size: int = 8  # answers sampled per prompt; advantages are normalised within the group
    iterations: int = (
        1  # gradient steps per rollout batch (1: the ratio is 1 and clipping is inert)
    )
    lr: float = 1e-4  # peak learning rate
    kl_coef: float = 0.04  # weight of the KL penalty to the frozen reference model
    max_new_tokens: int = 8  # answer length limit
    chat: bool = True  # ask in the tokenizer's chat format (false: plain completion "12+7=")
    val_fraction: float = 0.2  # share of problems held out for evaluation, by a hash of the text
    partial_credit: float = 0.0  # arithmetic: near-miss integers earn up to this (0 = exact only)
    cold_start_steps: int = (
        0  # arithmetic: supervised steps on correct answers before RL (0 = none)
    )
    cold_start_lr: float = 1e-3  # learning rate of the cold start (constant, AdamW)

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "task", ("arithmetic", "gsm8k"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"grpo.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.partial_credit < 1.0:
            raise ConfigError(
                f"grpo.partial_credit must be in [0, 1) (1 is the reward of a correct answer), "
                f"got {self.partial_credit}"
            )
        check_positive(self, "digits", "group_size", "iterations")
        if self.cold_start_steps < 0 or self.cold_start_lr <= 0:
            raise ConfigError("grpo.cold_start_steps must be >= 0 and grpo.cold_start_lr > 0")
        if self.group_size < 2:
            raise ConfigError(
                "grpo.group_size must be >= 2: advantages compare answers within a group"
            )
        bad = [c for c in self.ops if c not in "+-*"]
        if bad or not self.ops:
            raise ConfigError(f"grpo.ops must be made of + - *, got {self.ops!r}")
        if self.task == "gsm8k" and not self.path:
            raise ConfigError("grpo.task gsm8k needs grpo.path (a JSONL of question/answer rows)")
