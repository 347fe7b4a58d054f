"""The training sections: the loop every training stage shares, `pretrain:`, `dist:` and
`sample:`.

The one idea: the optimizer and loop fields are written once, in TrainLoopConfig; a stage's
section subclasses it and re-declares only the fields whose default or help differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config.base import ConfigError, check_choice, check_positive, section_name


@dataclass
class TrainLoopConfig:  # optimizer and loop settings every training stage shares (not a section)
    max_steps: int = 100  # optimizer steps (ppo, grpo: rollout batches)
    batch_size: int = 8  # examples per micro-batch (a preference pair counts once)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # longest prompt + answer in tokens (at most model.max_seq_len)
    lr: float = 5e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    warmup_steps: int = 10  # linear warmup from 0 to the peak
    schedule: str = "cosine"  # after warmup: cosine | wsd | constant
    decay_frac: float = 0.2  # wsd: fraction of steps spent in the final linear decay
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    eval_every: int = 50  # held-out metrics every N steps (0 = only at the end)
    log_every: int = 10  # write a metrics line every N steps
    save_every: int = 100  # write a checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # keep this many step checkpoints
    seed: int = 1337  # seeds data order, sampling and initialisation
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    compile: bool = False  # torch.compile the model (CUDA only; ignored on CPU)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    resume: bool = True  # continue from the newest checkpoint in the output folder if there is one
    overwrite: bool = (
        False  # move an existing run in the output folder aside (to NAME.old) and start afresh
    )

    def __post_init__(self):
        name = section_name(type(self))
        check_positive(self, "max_steps", "batch_size", "grad_accum", "seq_len", "log_every")
        check_positive(self, "keep_last")
        check_choice(self, "schedule", ("cosine", "wsd", "constant"))
        check_choice(self, "device", ("auto", "cpu", "cuda", "mps"))
        if self.lr <= 0:
            raise ConfigError(f"{name}.lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{name}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


# fields of the pretrain section that its subclasses (distill, prune) do not take
PRETRAIN_ONLY = ("init_from", "replay", "replay_fraction", "mask_fraction")


@dataclass
class PretrainConfig(
    TrainLoopConfig
):  # `pretrain:` next-token prediction on the prepared shards (lmforge pretrain)
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 256  # tokens per sequence (at most model.max_seq_len)
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 50  # linear warmup from 0 to the peak
    schedule: str = "cosine"  # after warmup: cosine | wsd (warmup-stable-decay) | constant
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on norms or embeddings)
    eval_every: int = 100  # evaluate validation loss every N steps (0 = only at the end)
    save_every: int = 200  # write a checkpoint every N steps (0 = only at the end)
    seed: int = 1337  # seeds initialisation and data order
    eval_tokens: int = 32768  # validation tokens per language per evaluation
    init_from: str = ""  # continue pretraining this model directory (its architecture, weights and tokenizer; the model section is ignored) with a fresh optimizer and a new warmup; "" = train from scratch
    replay: str = ""  # prepared data folder of general text mixed into every batch (with replay_fraction), against forgetting
    replay_fraction: float = 0.0  # share of each batch's rows taken from the replay data (0 = off)
    mask_fraction: float = 0.15  # encoders (model.arch bert): share of the real tokens that are masked-LM targets (of those 80% become the mask token, 10% a random token, 10% stay)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "eval_tokens")
        if type(self) is not PretrainConfig:  # distill and prune share the loop fields only
            given = [k for k in PRETRAIN_ONLY if getattr(self, k) != getattr(PretrainConfig, k)]
            if given:
                raise ConfigError(
                    f"{section_name(type(self))}: {', '.join(given)} apply to pretrain only"
                )
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(
                f"pretrain.replay_fraction must be in [0, 1), got {self.replay_fraction}"
            )
        if not 0.0 < self.mask_fraction < 1.0:
            raise ConfigError(
                f"pretrain.mask_fraction must be in (0, 1) (BERT's is 0.15), got {self.mask_fraction}"
            )
        if self.replay_fraction > 0 and not self.replay:
            raise ConfigError(
                f"pretrain.replay_fraction is {self.replay_fraction} but pretrain.replay names no "
                "data folder: give --replay DATA_DIR (a `lmforge prepare` output)"
            )


@dataclass
class DistConfig:  # `dist:` several processes under torchrun (torchrun --nproc_per_node N -m lmforge pretrain ...)
    strategy: str = "none"  # none (one process) | ddp (every rank holds the whole model) | fsdp (FSDP2: parameters, gradients and optimizer state sharded over ranks)
    tp: int = 1  # tensor-parallel degree: attention heads and MLP columns split over this many ranks (with fsdp over the rest: 2-D)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory, ~1/3 more compute)
    cpu_offload: bool = False  # fsdp: keep sharded parameters, gradients and optimizer state in CPU memory (CUDA runs)
    pp: int = 1  # pipeline-parallel degree (pretraining): the blocks split into this many consecutive stages, one per rank (with ddp over the rest)
    pp_schedule: str = "1f1b"  # gpipe (all forwards, then all backwards) | 1f1b (one forward, one backward: fewer activations held)
    pp_microbatches: int = 4  # micro-batches per pipeline step; must divide batch_size (the bubble is (pp-1)/(pp_microbatches+pp-1))
    timeout_s: int = 600  # a collective waiting longer than this fails the run instead of hanging

    def __post_init__(self):
        check_choice(self, "strategy", ("none", "ddp", "fsdp"))
        check_choice(self, "pp_schedule", ("gpipe", "1f1b"))
        check_positive(self, "tp", "pp", "pp_microbatches", "timeout_s")
        if self.pp > 1 and (self.tp > 1 or self.strategy == "fsdp"):
            raise ConfigError(
                "dist.pp combines with dist.strategy ddp (or none), not fsdp or dist.tp"
            )
        if self.pp_schedule == "1f1b" and self.pp_microbatches < self.pp:
            raise ConfigError(
                f"dist.pp_microbatches ({self.pp_microbatches}) must be at least dist.pp "
                f"({self.pp}) for the 1f1b schedule (PyTorch's Schedule1F1B); gpipe takes any"
            )
        if self.cpu_offload and self.strategy != "fsdp":
            raise ConfigError("dist.cpu_offload needs dist.strategy fsdp")


@dataclass
class SampleConfig:  # `sample:` generations written into the report after pretraining
    prompts: list[str] = field(
        default_factory=lambda: ["Once upon a time", "The history of"]
    )  # one sample per prompt
    max_new_tokens: int = 64  # tokens generated per prompt
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # keep only the k most likely tokens (0 = off)
    top_p: float = 0.95  # nucleus sampling threshold (1 = off)
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the text (1 = off)
    seed: int = 0  # sampling seed
    chat_prompts: list[str] = field(
        default_factory=lambda: ["What is the capital of France?", "用一句话介绍长城。"]
    )  # user messages answered before and after SFT (greedy), shown side by side in the report
    chat_max_new_tokens: int = 64  # tokens per chat answer
