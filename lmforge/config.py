"""Configuration: one flat dataclass per recipe section, YAML recipes, dotted CLI overrides.

The one idea: a recipe is plain data. Every key is checked against the dataclass it lands in,
so a typo is an error that names the closest valid key instead of a silently ignored value.
A field's trailing comment is its `--help` text (read from this file's source).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import glob as globlib
import hashlib
import inspect
import io
import json
import math
import numbers
import os
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or command-line value that cannot be used; the message names the key."""


# --------------------------------------------------------------------------- sections


@dataclass
class SourceConfig:  # one entry of `data.sources`
    name: str = ""  # short name used in reports and shard names
    path: str = ""  # file, folder or glob; relative: cwd, then the recipe's folder, then its parent
    format: str = "auto"  # txt | jsonl | parquet; auto = from the extension (.gz allowed)
    text_field: str = "text"  # jsonl/parquet: the field that holds the document text
    split_on: str = "blank_line"  # txt: what separates documents: file | blank_line | line
    min_chars: int = 0  # txt: join consecutive pieces until a document has this many characters
    lang: str = "en"  # language tag; validation loss and bits per byte are reported per language
    max_docs: int = 0  # read at most this many documents (0 = all)
    epochs: float = 0.0  # mixture: times its training documents are seen (GPT-3 style, e.g. 3.4 or 0.44); 0 = 1, or from weight
    weight: float = (
        0.0  # mixture: share of the training tokens (normalised over the sources; 0 = use epochs)
    )

    def __post_init__(self):
        if not self.name:
            self.name = Path(self.path).name.split(".")[0] or "source"
        _check_choice(self, "format", ("auto", "txt", "jsonl", "parquet"))
        _check_choice(self, "split_on", ("file", "blank_line", "line"))
        if not self.path:
            raise ConfigError(f"data source {self.name!r}: 'path' is required")
        if self.epochs < 0 or self.weight < 0:
            raise ConfigError(f"data source {self.name!r}: epochs and weight must be >= 0")
        if self.epochs and self.weight:
            raise ConfigError(
                f"data source {self.name!r}: set epochs or weight, not both "
                f"(a weight fixes the epochs once the source's tokens are counted)"
            )


@dataclass
class DataConfig:  # `data:` turns raw documents into token shards (lmforge prepare)
    sources: list[SourceConfig] = field(default_factory=list)  # documents to read (SourceConfig)
    val_fraction: float = 0.01  # share of documents held out for validation, by text hash
    num_workers: int = 2  # tokenizer worker processes
    shard_tokens: int = 100_000_000  # at most this many tokens per shard file
    train_tokens: int = (
        0  # mixture weights: training tokens to write in all (0 = one pass over every source)
    )

    def __post_init__(self):
        self.sources = [
            s if isinstance(s, SourceConfig) else build(SourceConfig, s, "data.sources")
            for s in self.sources
        ]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: duplicate source names {names}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check_positive(self, "num_workers", "shard_tokens")
        weighted = [s.name for s in self.sources if s.weight]
        if weighted and len(weighted) != len(self.sources):
            unweighted = [s.name for s in self.sources if not s.weight]
            raise ConfigError(
                f"data.sources: {', '.join(weighted)} set a mixture weight but "
                f"{', '.join(unweighted)} do not; give every source a weight, or use epochs"
            )
        if self.train_tokens < 0:
            raise ConfigError(f"data.train_tokens must be >= 0, got {self.train_tokens}")
        if self.train_tokens and not weighted:
            raise ConfigError("data.train_tokens needs mixture weights on the sources")


CLEAN_STEPS = (
    "normalize",
    "language",
    "quality",
    "toxicity",
    "pii",
    "exact_dedup",
    "near_dedup",
)
PII_TYPES = ("email", "phone", "ip", "credit_card", "national_id")
_BOILERPLATE = [
    r"(?i)\b(accept|use of) (all )?cookies\b",
    r"(?i)^\W*(privacy policy|terms of (use|service)|all rights reserved|cookie policy)\W*$",
    r"(?i)^\W*(click here|read more|sign up|log ?in|subscribe|share this)\b.{0,40}$",
    r"(?i)javascript (is|must be) (disabled|enabled)",
    r"^\W*(版权所有|隐私政策|点击这里|阅读全文|登录|注册|分享到)\W*.{0,20}$",
]


@dataclass
class CleanConfig:  # `clean:` filters raw documents before the tokenizer and prepare (lmforge clean)
    steps: list[str] = field(
        default_factory=list
    )  # in order, of: normalize language quality toxicity pii exact_dedup near_dedup; empty = no clean stage
    num_workers: int = 2  # worker processes (local executor) or concurrent tasks (ray)
    executor: str = "local"  # local (a process pool on this machine) | ray (tasks on a Ray cluster)
    ray_address: str = (
        ""  # ray: the cluster to join, e.g. ray://head:10001 ("" = a local Ray instance)
    )
    shard_docs: int = 2000  # documents per work unit; each becomes one output shard
    output_format: str = "jsonl"  # jsonl (gzipped) | parquet
    skip_bad_rows: bool = (
        False  # report unreadable lines (bad JSON, missing field, invalid UTF-8) and go on
    )
    examples: int = 3  # removed documents quoted per rule in the report
    # --- normalize
    fix_unicode: bool = True  # repair mojibake and broken escapes with ftfy
    unicode_form: str = "NFC"  # NFC | NFKC (also folds full-width forms) | none
    boilerplate: list[str] = field(
        default_factory=lambda: list(_BOILERPLATE)
    )  # regexes; matching lines are dropped
    # --- language
    languages: list[str] = field(
        default_factory=list
    )  # keep only these ISO 639-1 codes (e.g. [en, zh]); empty = keep all, only tag
    min_lang_score: float = 0.5  # below this confidence a document counts as language "unknown"
    # --- quality (Gopher/C4 rules; CJK text gets character-based versions)
    min_words: int = 50  # fewer words (CJK: min_chars characters) fails
    max_words: int = 100_000  # more words fails
    min_chars: int = 100  # CJK documents: fewer non-space characters fails
    min_mean_word_len: float = 3.0  # mean word length below this fails (not for CJK)
    max_mean_word_len: float = 10.0  # mean word length above this fails (not for CJK)
    max_symbol_ratio: float = 0.1  # '#' and ellipses per word (CJK: per character) above this fails
    max_digit_ratio: float = 0.3  # share of digits among non-space characters above this fails
    max_bullet_lines: float = 0.9  # share of lines starting with a bullet above this fails
    max_ellipsis_lines: float = 0.3  # share of lines ending in an ellipsis above this fails
    min_alpha_words: float = 0.8  # share of words with a letter below this fails (not for CJK)
    min_stop_words: int = 2  # fewer distinct stop words (English or Chinese function words) fails
    max_dup_lines: float = 0.3  # share of lines that are repeats above this fails
    max_dup_line_chars: float = 0.2  # share of characters in repeated lines above this fails
    max_top_ngram: list[float] = field(
        default_factory=lambda: [0.2, 0.18, 0.16]
    )  # most frequent 2,3,4-gram's character share (CJK: character 2,3,4-grams)
    max_dup_ngram: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    )  # share of characters in repeated 5..10-grams
    # --- toxicity
    toxicity_classifier: str = "wordlist"  # wordlist (bundled English and Chinese lists) or a name given to register_classifier
    max_toxicity: float = 0.5  # documents scoring at or above this are removed (0..1)
    # --- pii
    pii_types: list[str] = field(
        default_factory=lambda: list(PII_TYPES)
    )  # replaced by typed placeholders such as <EMAIL>
    # --- dedup
    shingle_size: int = 3  # near_dedup: words per shingle (characters for CJK text)
    num_perm: int = 128  # near_dedup: MinHash permutations
    dedup_threshold: float = 0.5  # near_dedup: estimated Jaccard similarity of shingle sets that makes a duplicate (3-word shingles at 0.5 catch copies with ~5% of words edited)
    seed: int = 1  # near_dedup: MinHash seed

    def __post_init__(self):
        bad = [s for s in self.steps if s not in CLEAN_STEPS]
        if bad:
            raise ConfigError(
                f"clean.steps: unknown step {bad[0]!r}{_did_you_mean(bad[0], CLEAN_STEPS)}; "
                f"steps are {', '.join(CLEAN_STEPS)}"
            )
        if len(set(self.steps)) != len(self.steps):
            raise ConfigError(f"clean.steps lists a step twice: {self.steps}")
        dedup = [i for i, s in enumerate(self.steps) if s.endswith("_dedup")]
        if dedup and dedup[0] < len(self.steps) - len(dedup):
            raise ConfigError(
                f"clean.steps: {self.steps[dedup[0]]} must come after the per-document steps "
                f"(it compares the cleaned documents of the whole corpus); got {self.steps}"
            )
        _check_choice(self, "executor", ("local", "ray"))
        _check_choice(self, "output_format", ("jsonl", "parquet"))
        _check_choice(self, "unicode_form", ("NFC", "NFKC", "none"))
        _check_positive(self, "num_workers", "shard_docs", "shingle_size", "num_perm")
        bad = [t for t in self.pii_types if t not in PII_TYPES]
        if bad:
            raise ConfigError(f"clean.pii_types: unknown type {bad[0]!r}; types are {PII_TYPES}")
        for name in ("min_lang_score", "dedup_threshold", "max_toxicity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"clean.{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.max_top_ngram) != 3 or len(self.max_dup_ngram) != 6:
            raise ConfigError(
                "clean.max_top_ngram takes 3 values (2,3,4-grams) and clean.max_dup_ngram 6 (5..10-grams)"
            )
        for pattern in self.boilerplate:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"clean.boilerplate: bad regex {pattern!r}: {e}") from None


@dataclass
class TokenizerConfig:  # `tokenizer:` byte-level BPE (lmforge tokenizer)
    vocab_size: int = 8192  # total size, special tokens included
    sample_chars: int = 20_000_000  # train on at most this many characters of training documents
    min_frequency: int = 2  # a merge must occur at least this often in the sample
    path: str = ""  # use this existing tokenizer directory instead of training one

    def __post_init__(self):
        if self.vocab_size < 300:
            raise ConfigError(
                "tokenizer.vocab_size must be at least 300 (256 bytes + special tokens)"
            )
        _check_positive(self, "sample_chars", "min_frequency")


# What each Hugging Face family computes. `arch` names the family a checkpoint is saved as; the
# model itself branches only on the features (norm, mlp, pos, biases), so they must match it.
ARCH_FEATURES = {
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, bias=False),
    "qwen2": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=True, bias=False),
    "mistral": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, bias=False),
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, bias=True),
}


# building a model module by module takes about a millisecond a layer: a million layers (a typo)
# would hang for minutes before any memory check could help
MAX_LAYERS = 1024


@dataclass
class ModelConfig:  # `model:` a decoder-only Transformer; the fields map onto LlamaConfig (or kin)
    vocab_size: int = 0  # 0 = take it from the tokenizer
    dim: int = 256  # hidden_size
    n_layer: int = 4  # num_hidden_layers
    n_head: int = 4  # num_attention_heads
    n_kv_head: int = 0  # num_key_value_heads (grouped-query attention); 0 = n_head
    head_dim: int = 0  # width of one attention head; 0 = dim / n_head
    ffn_dim: int = 0  # intermediate_size; 0 = 8/3 * dim rounded up to 64s (swiglu), 4 * dim (gelu)
    max_seq_len: int = 512  # max_position_embeddings
    rope_theta: float = 10000.0  # rotary embedding base
    norm_eps: float = 1e-5  # rms_norm_eps (layer_norm_epsilon for layernorm)
    tie_embeddings: bool = True  # tie_word_embeddings: input embedding = output head
    init_std: float = 0.02  # initializer_range
    bos_token_id: int = 1  # set from the tokenizer by the pipeline
    eos_token_id: int = 2  # set from the tokenizer by the pipeline
    arch: str = "llama"  # HF family of the checkpoint: llama | qwen2 | mistral | gpt2
    norm: str = "rmsnorm"  # rmsnorm | layernorm (gpt2)
    mlp: str = "swiglu"  # swiglu (gated) | gelu (gpt2: tanh-approximate GELU, not gated)
    pos: str = "rope"  # positions: rope | learned (gpt2: a table added to the token embeddings)
    qkv_bias: bool = False  # the q/k/v projections have biases (qwen2, gpt2)
    bias: bool = False  # every other linear layer and the norms have biases (gpt2)
    sliding_window: int = 0  # attend to at most this many latest positions (mistral); 0 = all
    # kept as config.json writes it: {rope_type: linear | dynamic | yarn | llama3, factor, ...};
    # model/transformer.py rope_frequencies computes each kind
    rope_scaling: dict = field(default_factory=dict)  # HF rope_scaling (a mapping); {} = none

    def __post_init__(self):
        _check_types(self)  # config.json values arrive unchecked: "256" or true for a width
        _check_rope_scaling(self.rope_scaling)
        _check_choice(self, "arch", tuple(ARCH_FEATURES))
        _check_choice(self, "norm", ("rmsnorm", "layernorm"))
        _check_choice(self, "mlp", ("swiglu", "gelu"))
        _check_choice(self, "pos", ("rope", "learned"))
        wrong = {k: v for k, v in ARCH_FEATURES[self.arch].items() if getattr(self, k) != v}
        if wrong:
            need = ", ".join(f"{k}: {str(v).lower()}" for k, v in wrong.items())
            raise ConfigError(f"model.arch {self.arch!r} computes with {need}; set those too")
        if self.sliding_window and self.arch != "mistral":
            raise ConfigError(f"model.sliding_window needs arch 'mistral', not {self.arch!r}")
        _check_positive(self, "dim", "n_layer", "n_head", "max_seq_len")
        for name in (
            "vocab_size",
            "n_kv_head",
            "head_dim",
            "ffn_dim",
            "bos_token_id",
            "eos_token_id",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.init_std < 0:
            raise ConfigError(f"model.init_std must be >= 0, got {self.init_std}")
        if self.n_layer > MAX_LAYERS:
            raise ConfigError(
                f"model.n_layer ({self.n_layer}) is over {MAX_LAYERS}: deeper than any published "
                f"model (about 130 layers), so most likely a typo"
            )
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.head_dim == 0 and self.dim % self.n_head:
            raise ConfigError(
                f"model.dim ({self.dim}) must be divisible by model.n_head ({self.n_head})"
            )
        self.head_dim = self.head_dim or self.dim // self.n_head
        if self.ffn_dim == 0:
            gated = 64 * -(-(8 * self.dim // 3) // 64)  # SwiGLU's 8/3 keeps the parameter count
            self.ffn_dim = 4 * self.dim if self.mlp == "gelu" else gated
        _check_positive(self, "n_kv_head", "head_dim", "ffn_dim")
        if self.sliding_window < 0:
            raise ConfigError(f"model.sliding_window must be >= 0, got {self.sliding_window}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"model.head_dim ({self.head_dim}) must be even for rotary embeddings"
            )
        plain_mha = self.head_dim * self.n_head == self.dim and self.n_kv_head == self.n_head
        if self.arch == "gpt2" and not plain_mha:  # HF's c_attn is three dim x dim blocks
            raise ConfigError("gpt2 needs model.head_dim = dim / n_head and n_kv_head = n_head")


# rope_scaling kinds we compute -> the numbers each needs (transformers' names)
ROPE_SCALING = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# optional numbers of a kind; any other key is an error, so a setting is never silently ignored
ROPE_SCALING_OPTIONAL = {
    "yarn": (
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
    ),
    "dynamic": ("original_max_position_embeddings",),
}


def _check_rope_scaling(s) -> None:
    """A rope_scaling dict names a kind we compute and the numbers that kind needs."""
    if not isinstance(s, dict):
        raise ConfigError(f"model.rope_scaling must be a mapping (or {{}} for none), got {s!r}")
    if not s:
        return
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return
    if kind not in ROPE_SCALING:
        raise ConfigError(
            f"model.rope_scaling: rope_type {kind!r} is not supported; supported: "
            f"{', '.join(ROPE_SCALING)}"
        )
    needed, optional = ROPE_SCALING[kind], ROPE_SCALING_OPTIONAL.get(kind, ())
    missing = [k for k in needed if k not in s]
    if missing:
        raise ConfigError(f"model.rope_scaling ({kind}) is missing {', '.join(missing)}")
    known = {"rope_type", "type", "truncate", *needed, *optional}
    extra = sorted(set(s) - known)
    if extra:
        raise ConfigError(
            f"model.rope_scaling ({kind}): {', '.join(extra)} not supported; known: "
            f"{', '.join(sorted(known))}"
        )
    for k in (*needed, *optional):
        v = s.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(
                f"model.rope_scaling ({kind}): {k} must be a positive number, got {v!r}"
            )
    if kind == "llama3" and not s["high_freq_factor"] > s["low_freq_factor"]:
        raise ConfigError(
            "model.rope_scaling (llama3): high_freq_factor must be greater than low_freq_factor"
        )


def model_memory(cfg: ModelConfig) -> dict[str, int]:
    """Bytes that building `cfg` in float32 takes, by part: the parameters (tied embeddings
    counted once) and the rotary tables, two (max_seq_len, head_dim) buffers, which a long
    context makes large however small the model."""
    D, F, H, KV, hd = cfg.dim, cfg.ffn_dim, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    norm = D * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    layer = D * (H + 2 * KV) * hd + H * hd * D + 2 * norm  # attention, two norms
    layer += (3 if cfg.mlp == "swiglu" else 2) * D * F  # gate, up, down | up, down
    if cfg.qkv_bias:
        layer += (H + 2 * KV) * hd
    if cfg.bias:  # output projection and MLP biases
        layer += D + D + (2 * F if cfg.mlp == "swiglu" else F)
    params = cfg.n_layer * layer + norm + cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    if cfg.pos == "learned":
        params += cfg.max_seq_len * D
    rope = 2 * cfg.max_seq_len * hd if cfg.pos == "rope" else 0
    return {"parameters": 4 * params, "rotary tables": 4 * rope}


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_model_fits(cfg: ModelConfig, limit: int | None = None, shards: int = 1) -> None:
    """Refuse, before allocating anything, a model whose float32 parameters and buffers exceed
    `limit` bytes (default: this machine's RAM), naming the fields that make it that big. With
    `shards` ranks sharing the parameters (FSDP), each holds only its part of them."""
    limit = limit or physical_memory()
    parts = model_memory(cfg)
    parts["parameters"] //= max(1, shards)
    total = sum(parts.values())
    if not limit or total <= limit:
        return
    gb = lambda n: f"{n / 2**30:,.1f} GB"  # noqa: E731
    shown = ", ".join(f"{k} {gb(v)}" for k, v in parts.items() if v)
    if parts["rotary tables"] > parts["parameters"]:
        fields = f"model.max_seq_len ({cfg.max_seq_len})"
    else:
        fields = ", ".join(
            f"model.{k} ({getattr(cfg, k)})" for k in ("n_layer", "dim", "ffn_dim", "vocab_size")
        )
    raise ConfigError(
        f"model: building it would take about {gb(total)} ({shown}), more than this machine's "
        f"{gb(limit)} of memory; check {fields}"
    )


# fields of the pretrain section that its subclasses (distill, prune) do not take
PRETRAIN_ONLY = ("init_from", "replay", "replay_fraction")


@dataclass
class PretrainConfig:  # `pretrain:` next-token prediction on the prepared shards (lmforge pretrain)
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per sequence (at most model.max_seq_len)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    warmup_steps: int = 50  # linear warmup from 0 to the peak
    schedule: str = "cosine"  # after warmup: cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # wsd: fraction of steps spent in the final linear decay
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on norms or embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    eval_every: int = 100  # evaluate validation loss every N steps (0 = only at the end)
    eval_tokens: int = 32768  # validation tokens per language per evaluation
    log_every: int = 10  # write a metrics line every N steps
    save_every: int = 200  # write a checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # keep this many step checkpoints
    seed: int = 1337  # seeds initialisation and data order
    init_from: str = ""  # continue pretraining this model directory (its architecture, weights and tokenizer; the model section is ignored) with a fresh optimizer and a new warmup; "" = train from scratch
    replay: str = ""  # prepared data folder of general text mixed into every batch (with replay_fraction), against forgetting
    replay_fraction: float = 0.0  # share of each batch's rows taken from the replay data (0 = off)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    compile: bool = False  # torch.compile the model (CUDA only; ignored on CPU)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    resume: bool = True  # continue from the newest checkpoint in the output folder if there is one
    overwrite: bool = (
        False  # move an existing run in the output folder aside (to NAME.old) and start afresh
    )

    def __post_init__(self):
        _check_positive(self, "max_steps", "batch_size", "grad_accum", "seq_len", "eval_tokens")
        _check_positive(self, "log_every", "keep_last")
        _check_choice(self, "schedule", ("cosine", "wsd", "constant"))
        _check_choice(self, "device", ("auto", "cpu", "cuda", "mps"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"{_section_name(type(self))}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
            )
        if self.lr <= 0:
            raise ConfigError(f"{_section_name(type(self))}.lr must be positive, got {self.lr}")
        section = _section_name(type(self))
        if type(self) is not PretrainConfig:  # distill and prune share the loop fields only
            given = [k for k in PRETRAIN_ONLY if getattr(self, k)]
            if given:
                raise ConfigError(f"{section}: {', '.join(given)} apply to pretrain only")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(
                f"pretrain.replay_fraction must be in [0, 1), got {self.replay_fraction}"
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
    timeout_s: int = 600  # a collective waiting longer than this fails the run instead of hanging

    def __post_init__(self):
        _check_choice(self, "strategy", ("none", "ddp", "fsdp"))
        _check_positive(self, "tp", "timeout_s")
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


@dataclass
class TrainLoopConfig:  # optimizer and loop settings shared by the alignment stages (not a section)
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
        name = _section_name(type(self))
        _check_positive(self, "max_steps", "batch_size", "grad_accum", "seq_len", "log_every")
        _check_positive(self, "keep_last")
        _check_choice(self, "schedule", ("cosine", "wsd", "constant"))
        _check_choice(self, "device", ("auto", "cpu", "cuda", "mps"))
        if self.lr <= 0:
            raise ConfigError(f"{name}.lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{name}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


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

    def __post_init__(self):
        super().__post_init__()
        self.sources = [
            s if isinstance(s, SFTSourceConfig) else build(SFTSourceConfig, s, "sft.sources")
            for s in self.sources
        ]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"sft.sources: duplicate source names {names}")
        _check_choice(self, "overflow", ("truncate", "drop"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"sft.val_fraction must be in [0, 1), got {self.val_fraction}")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoRAConfig:  # `lora:` low-rank adapters for fine-tuning (r = 0: train every weight)
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


@dataclass
class BaseConfig:  # `base:` start `lmforge run` from an existing model instead of pretraining one
    model: str = ""  # a name `lmforge fetch` knows (smollm2-135m-instruct) or a model directory; "" = pretrain from scratch


QUANTIZED_NAME = re.compile(r"^(int8|int4-g\d+|gptq-g\d+)(-act)?$")  # OUT/quantize/<name>
RUN_MODELS = ("pretrain", "base", "sft", "dpo")


@dataclass
class EvalConfig:  # `eval:` the report card written by `lmforge run` (lmforge eval for one model)
    tasks: list[str] = field(
        default_factory=lambda: ["mmlu", "cmmlu", "gsm8k", "humaneval"]
    )  # task names (see lmforge eval --help); empty = no evaluation stage
    limit: int = 100  # at most this many examples per task (0 = all); lm: tasks read it as tokens per language
    limits: dict = field(
        default_factory=dict
    )  # per task, overriding limit: {gsm8k: 20, "lm:data": 32768}
    models: list[str] = field(
        default_factory=lambda: ["pretrain", "sft", "dpo"]
    )  # which of the run's models to evaluate, side by side: pretrain | base | sft | dpo | a quantize output (int8, gptq-g64, ...); skipped when absent
    seed: int = 0  # seed for sampling tasks
    unsafe_exec: bool = False  # run HumanEval's generated code even where the sandbox is weak

    def __post_init__(self):
        bad = [m for m in self.models if m not in RUN_MODELS and not QUANTIZED_NAME.match(m)]
        if bad:
            raise ConfigError(
                f"eval.models: unknown model {bad[0]!r}; choose {', '.join(RUN_MODELS)} or a "
                "quantize output name (int8, int4-g64, gptq-g64)"
            )
        if self.limit < 0:
            raise ConfigError(f"eval.limit must be >= 0, got {self.limit}")
        for task, n in self.limits.items():
            if task not in self.tasks:
                raise ConfigError(f"eval.limits: {task!r} is not one of eval.tasks {self.tasks}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ConfigError(f"eval.limits.{task} must be an integer >= 0, got {n!r}")


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
        where = _section_name(type(self))
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
        _check_positive(self, "max_prompt_len")
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
    lora_r: int = 0  # LoRA rank (0 = full fine-tuning); alpha, dropout, targets from `lora:`
    judge: str = ""  # reward-model directory: score policy vs reference answers on held-out prompts
    judge_prompts: int = 64  # held-out prompts answered by both models for the judge's win rate
    judge_max_new_tokens: int = 64  # answer length for the win rate (greedy)

    def __post_init__(self):
        super().__post_init__()
        _check_choice(self, "loss", ("sigmoid", "ipo"))
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.lora_r < 0 or self.judge_prompts < 0 or self.sft_weight < 0:
            raise ConfigError("dpo.lora_r, dpo.judge_prompts and dpo.sft_weight must be >= 0")


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
        _check_positive(self, "prompts_per_step", "max_new_tokens", "clip_range")
        if self.temperature <= 0 or self.kl_coef < 0 or self.eval_prompts < 0:
            raise ConfigError(
                f"{_section_name(type(self))}: temperature must be > 0, kl_coef and eval_prompts >= 0"
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
        _check_choice(self, "reward", ("model", "qa"))
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"ppo.sources: duplicate source names {names}")
        _check_positive(self, "ppo_epochs", "minibatch_size", "target_kl", "kl_horizon")
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
        _check_choice(self, "task", ("arithmetic", "gsm8k"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"grpo.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.partial_credit < 1.0:
            raise ConfigError(
                f"grpo.partial_credit must be in [0, 1) (1 is the reward of a correct answer), "
                f"got {self.partial_credit}"
            )
        _check_positive(self, "digits", "group_size", "iterations")
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


QUANT_METHODS = ("int8", "int4", "gptq")
GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantizeConfig:  # `quantize:` weight-only quantization of a trained model (lmforge quantize)
    method: str = "int8"  # int8 (per output channel) | int4 (group-wise, round to nearest) | gptq (int4, GPTQ)
    group_size: int = 64  # int4, gptq: weights sharing one scale and zero point (32, 64 or 128)
    head_bits: int = 8  # output head (and a tied embedding): 8 = int8 per row, 0 = keep in float
    outlier_threshold: float = 0.0  # int8: input features whose calibration activations exceed this stay float (LLM.int8 uses 6; 0 = off)
    max_outliers: int = 0  # int8: at most this many float features per layer (0 = no limit)
    calib_samples: int = (
        64  # gptq and outliers: calibration sequences drawn from the training shards
    )
    calib_seq_len: int = 256  # tokens per calibration sequence
    damp: float = 0.01  # gptq: added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # gptq: columns per lazy batch update
    act_order: bool = False  # gptq: quantize columns in order of decreasing Hessian diagonal
    eval_tokens: int = (
        32768  # validation tokens per language for the perplexity before and after (0 = skip)
    )
    seed: int = 0  # picks the calibration sequences
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    methods: list[str] = field(
        default_factory=list
    )  # lmforge run: quantize the run's final model once per method listed (the other fields apply to each); [] = no quantize stage

    def __post_init__(self):
        _check_choice(self, "method", QUANT_METHODS)
        for m in self.methods:
            if m not in QUANT_METHODS:
                raise ConfigError(
                    f"quantize.methods: {m!r} is not one of {', '.join(QUANT_METHODS)}"
                )
        _check_choice(self, "device", ("auto", "cpu", "cuda", "mps"))
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(
                f"quantize.group_size must be one of {', '.join(map(str, GROUP_SIZES))}; "
                f"got {self.group_size}"
            )
        if self.head_bits not in (0, 8):
            raise ConfigError(f"quantize.head_bits must be 8 or 0 (float), got {self.head_bits}")
        _check_positive(self, "calib_samples", "calib_seq_len", "block_size")
        if self.damp <= 0 or self.outlier_threshold < 0 or self.max_outliers < 0:
            raise ConfigError("quantize.damp must be > 0, outlier_threshold and max_outliers >= 0")
        if self.eval_tokens < 0:
            raise ConfigError(f"quantize.eval_tokens must be >= 0, got {self.eval_tokens}")


@dataclass
class DistillConfig(
    PretrainConfig
):  # `distill:` train a smaller student on a teacher's logits (lmforge distill)
    max_steps: int = 200  # optimizer steps (the baseline student trains as many)
    batch_size: int = 8  # sequences per micro-batch
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 20  # linear warmup from 0 to the peak
    eval_every: int = 50  # evaluate validation loss every N steps (0 = only at the end)
    save_every: int = 100  # write a checkpoint every N steps (0 = only at the end)
    dim: int = 128  # student width (the rest of its shape follows the teacher unless set here)
    n_layer: int = 0  # student layers (0 = the teacher's)
    n_head: int = 0  # student attention heads (0 = dim / the teacher's head_dim)
    n_kv_head: int = 0  # student key/value heads (0 = n_head)
    ffn_dim: int = 0  # student MLP width (0 = the model default for its width)
    temperature: float = 1.0  # softens both distributions in the KL term (Hinton et al. 2015)
    alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy
    baseline: bool = True  # also train the same student without a teacher, for comparison

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0 or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("distill.temperature must be > 0 and distill.alpha in [0, 1]")
        if min(self.dim, self.n_layer, self.n_head, self.n_kv_head, self.ffn_dim) < 0:
            raise ConfigError(
                "distill: student dim, n_layer, n_head, n_kv_head, ffn_dim must be >= 0"
            )
        _check_positive(self, "dim")


PRUNE_METHODS = ("magnitude", "2:4", "structured")


@dataclass
class PruneConfig(
    PretrainConfig
):  # `prune:` remove weights, then optionally recover (lmforge prune)
    method: str = "magnitude"  # magnitude (unstructured) | 2:4 (two of every four inputs) | structured (heads, MLP channels)
    sparsity: float = 0.5  # magnitude: fraction of each matrix's weights set to zero
    heads: float = 0.25  # structured: fraction of attention heads removed from every layer
    ffn: float = 0.25  # structured: fraction of MLP channels removed from every layer
    calib_samples: int = (
        32  # structured: sequences from the training shards that score heads and channels
    )
    max_steps: int = (
        0  # recovery fine-tune steps on the pretraining corpus (0 = none); pruned weights stay zero
    )
    lr: float = 3e-4  # recovery: peak learning rate
    warmup_steps: int = 10  # recovery: linear warmup
    eval_every: int = 0  # recovery: validation every N steps (0 = only at the end)
    save_every: int = 0  # recovery: checkpoint every N steps (0 = only at the end)

    def __post_init__(self):
        recover = self.max_steps
        self.max_steps = max(recover, 1)  # the loop fields are checked as if a recovery ran
        super().__post_init__()
        self.max_steps = recover
        _check_choice(self, "method", PRUNE_METHODS)
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"prune.sparsity must be in [0, 1), got {self.sparsity}")
        if not (0.0 <= self.heads < 1.0 and 0.0 <= self.ffn < 1.0):
            raise ConfigError("prune.heads and prune.ffn must be in [0, 1)")
        if recover < 0:
            raise ConfigError(f"prune.max_steps must be >= 0, got {recover}")
        _check_positive(self, "calib_samples")


SECTIONS: dict[str, type] = {
    "base": BaseConfig,
    "data": DataConfig,
    "clean": CleanConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelConfig,
    "pretrain": PretrainConfig,
    "dist": DistConfig,
    "sample": SampleConfig,
    "sft": SFTConfig,
    "lora": LoRAConfig,
    "eval": EvalConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "quantize": QuantizeConfig,
    "distill": DistillConfig,
    "prune": PruneConfig,
}


@dataclass
class Recipe:
    """A whole pipeline: one config per section, plus where the recipe file lives."""

    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    base_dir: str = "."  # folder of the recipe file, for resolving relative paths


# Training options that change how a run is watched, where it runs or what happens to an old
# one, not what a step computes: `lmforge run` leaves them out of a stage's hash, and a resumed
# run may change them (and max_steps, to extend a run: the schedule then follows the new
# horizon). Any other change (lr, batch, model, data) is refused on resume.
RUNTIME_FIELDS = (
    "resume",
    "overwrite",
    "device",
    "threads",
    "compile",
    "log_every",
    "eval_every",
    "save_every",
    "keep_last",
    "eval_tokens",
    "skip_bad_rows",
)


# --------------------------------------------------------------------------- building


def _check_positive(cfg, *names):
    section = _section_name(type(cfg))
    for n in names:
        v = getattr(cfg, n)
        if v <= 0:
            raise ConfigError(f"{section}.{n} must be positive, got {v}")


def _check_types(cfg) -> None:
    """Each int, float, bool and str field holds that type (an int for a float is fine; a bool
    is not a number): for values that come from JSON rather than through `coerce`."""
    section = _section_name(type(cfg))
    want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    for name, tp in _field_types(type(cfg)).items():
        v = getattr(cfg, name)
        if tp is int and isinstance(v, numbers.Integral) and not isinstance(v, bool):
            setattr(cfg, name, int(v))
        elif tp is float and isinstance(v, numbers.Real) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise ConfigError(f"{section}.{name} must be a finite number, got {v!r}")
            setattr(cfg, name, float(v))
        elif tp in want and (not isinstance(v, tp) or (tp is not bool and isinstance(v, bool))):
            raise ConfigError(
                f"{section}.{name} must be {want[tp]}, got {v!r} ({type(v).__name__})"
            )


def _check_choice(cfg, name, choices):
    v = getattr(cfg, name)
    if v not in choices:
        raise ConfigError(
            f"{_section_name(type(cfg))}.{name} must be one of {', '.join(choices)}; got {v!r}"
        )


def _section_name(cls) -> str:
    for k, v in SECTIONS.items():
        if v is cls:
            return k
    nested = {SourceConfig: "data.sources", SFTSourceConfig: "sft.sources"}
    nested[PreferenceSourceConfig] = "preference source"
    return nested.get(cls, cls.__name__)


def _did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown key {key!r} in {where}{hint}")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or explain why not."""
    origin = typing.get_origin(tp)
    if tp is dict or origin is dict:
        if isinstance(value, str):  # from the command line: a YAML mapping, "{gsm8k: 20}"
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping such as {{key: value}}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        if dataclasses.is_dataclass(inner):
            return value
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "1",
            "on",
            "false",
            "no",
            "0",
            "off",
        ):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            if tp is int:
                f = float(str(value).replace("_", ""))
                if f != int(f):
                    raise ValueError
                return int(f)
            return float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(
                f"{where} must be {'an integer' if tp is int else 'a number'}, got {value!r}"
            ) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def build(cls, values: dict | None, where: str):
    """Make a section dataclass from a dict, rejecting unknown keys and converting types."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {values!r}")
    types = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise unknown_key_error(k, names, where)
        kwargs[k] = coerce(v, types[k], f"{where}.{k}")
    return cls(**kwargs)


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe (or start from the defaults) and apply `section.key` overrides."""
    raw: dict[str, Any] = {}
    base_dir = "."
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {p} must be a mapping of sections, got {type(raw).__name__}")
        base_dir = str(p.resolve().parent)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise unknown_key_error(section, list(SECTIONS), "the recipe's sections")
        if not name:
            raise ConfigError(f"override {key!r} must look like section.key")
        sec = raw.setdefault(section, {}) or {}
        raw[section] = sec
        sec[name] = value
    kwargs = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise unknown_key_error(section, list(SECTIONS), "the recipe's sections")
        kwargs[section] = build(SECTIONS[section], values, section)
    return Recipe(**kwargs, base_dir=base_dir)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(*parts: Any) -> str:
    """A short stable hash of configs (dataclasses or plain data); stages use it to skip work."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_path(path: str, base_dir: str = ".") -> Path:
    """Find a path given in a recipe: as written (cwd), then next to the recipe, then one level up."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    base = Path(base_dir)
    is_glob = any(ch in path for ch in "*?[")
    for cand in (p, base / p, base.parent / p):
        # glob.glob, not Path.glob on the parent: the wildcard may be in a folder name
        if cand.exists() or (is_glob and globlib.glob(str(cand), recursive=True)):
            return cand
    return p


# --------------------------------------------------------------------------- help text


def field_help(cls) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source (and its dataclass bases',
    a subclass's comment winning): that is its --help. Read with ast + tokenize so a field
    wrapped over several lines still finds its comment."""
    out = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update(_own_field_help(base))
    return out


def _own_field_help(cls) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline)
        if tok.type == tokenize.COMMENT
    }
    out = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, node.end_lineno + 1)
            text = next((comments[n] for n in lines if n in comments), None)
            if text:
                out[node.target.id] = text
    return out
