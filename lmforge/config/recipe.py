"""A recipe: one config per section, read from YAML and `section.key` overrides.

The one idea: a recipe is plain data; SECTIONS maps each top-level key to its dataclass, and
`load_recipe` builds each section from its mapping, so an unknown key anywhere is an error.
"""

from __future__ import annotations

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
from lmforge.config.base import SECTION_NAMES, ConfigError, build, unknown_key_error
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
