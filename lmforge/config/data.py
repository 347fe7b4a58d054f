"""The sections that turn raw documents into token shards: `data:` (with its sources),
`clean:` and `tokenizer:`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config.base import ConfigError, build, check_choice, check_positive, did_you_mean


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
        check_choice(self, "format", ("auto", "txt", "jsonl", "parquet"))
        check_choice(self, "split_on", ("file", "blank_line", "line"))
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
        check_positive(self, "num_workers", "shard_tokens")
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
                f"clean.steps: unknown step {bad[0]!r}{did_you_mean(bad[0], CLEAN_STEPS)}; "
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
        check_choice(self, "executor", ("local", "ray"))
        check_choice(self, "output_format", ("jsonl", "parquet"))
        check_choice(self, "unicode_form", ("NFC", "NFKC", "none"))
        check_positive(self, "num_workers", "shard_docs", "shingle_size", "num_perm")
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
        check_positive(self, "sample_chars", "min_frequency")
