"""A recipe: one config per section, read from YAML and `section.key` overrides.

The one idea: a recipe is plain data; SECTIONS maps each top-level key to its dataclass, and
`load_recipe` builds each section from its mapping, so an unknown key anywhere is an error.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.config.align import (
    DPOConfig,
    GRPOConfig,
    LoRAConfig,
    PPOConfig,
    PreferenceSourceConfig,
    RewardConfig,
    SFTConfig,
    SFTSourceConfig,
)
from lmforge.config.base import (
    SECTION_NAMES,
    ConfigError,
    build,
    coerce,
    unknown_key_error,
    warn_deprecated,
)
from lmforge.config.compress import DistillConfig, PruneConfig, QuantizeConfig
from lmforge.config.data import CleanConfig, DataConfig, SourceConfig, TokenizerConfig
from lmforge.config.eval import EvalConfig
from lmforge.config.model import BaseConfig, ModelConfig
from lmforge.config.train import DistConfig, PretrainConfig, SampleConfig

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
    "eval": EvalConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "quantize": QuantizeConfig,
    "distill": DistillConfig,
    "prune": PruneConfig,
}
# the top-level `lora:` of before each adapting stage had its own (sft.lora, dpo.lora): read
# for one more release, as it applied then: every key to sft, all but the rank to dpo
OLD_SECTIONS: dict[str, type] = {"lora": LoRAConfig}
OLD_LORA_TO = {"sft": ("r", "alpha", "dropout", "targets"), "dpo": ("alpha", "dropout", "targets")}
SECTION_NAMES.update({cls: name for name, cls in SECTIONS.items()})
SECTION_NAMES.update(
    {
        SourceConfig: "data.sources",
        SFTSourceConfig: "sft.sources",
        PreferenceSourceConfig: "preference source",
    }
)


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
        if section not in SECTIONS and section not in OLD_SECTIONS:
            raise unknown_key_error(section, list(SECTIONS), "the recipe's sections")
        if not name:
            raise ConfigError(f"override {key!r} must look like section.key")
        sec = _mapping(raw, section)
        sub, _, subname = name.partition(".")  # a sub-section's key: sft.lora.r
        if subname:
            sec = _mapping(sec, sub)
        sec[subname or name] = value
    _fold_old_lora(raw)
    kwargs = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise unknown_key_error(section, list(SECTIONS), "the recipe's sections")
        kwargs[section] = build(SECTIONS[section], values, section)
    return Recipe(**kwargs, base_dir=base_dir)


def _mapping(parent: dict, key: str) -> dict:
    """parent[key] as a dict to add keys to (created when absent or empty)."""
    if not parent.get(key):
        parent[key] = {}
    if not isinstance(parent[key], dict):
        raise ConfigError(f"{key} must be a mapping of keys to values, got {parent[key]!r}")
    return parent[key]


def _fold_old_lora(raw: dict) -> None:
    """Move the old top-level `lora:` into sft.lora and dpo.lora (see OLD_LORA_TO), with a
    deprecation message; a key the new spelling also sets must agree with it."""
    if "lora" not in raw:
        return
    old = raw.pop("lora") or {}
    warn_deprecated(
        "the top-level `lora:` section (--lora.KEY in lmforge run)",
        "sft.lora / dpo.lora in a recipe, --sft.lora.KEY in lmforge run, "
        "--lora.KEY in lmforge sft and lmforge dpo",
    )
    if not isinstance(old, dict):
        raise ConfigError(f"lora must be a mapping of keys to values, got {old!r}")
    names = [f.name for f in dataclasses.fields(LoRAConfig)]
    hints = typing.get_type_hints(LoRAConfig)
    for key in old:
        if key not in names:
            raise unknown_key_error(key, names, "section 'lora'")
    for stage, keys in OLD_LORA_TO.items():
        new = _mapping(_mapping(raw, stage), "lora")
        for key in (k for k in keys if k in old):
            value = coerce(old[key], hints[key], f"lora.{key}")
            if key in new and coerce(new[key], hints[key], f"{stage}.lora.{key}") != value:
                raise ConfigError(
                    f"lora.{key} ({old[key]!r}, the old spelling) and {stage}.lora.{key} "
                    f"({new[key]!r}) disagree: give {stage}.lora.{key} only"
                )
            new[key] = value
