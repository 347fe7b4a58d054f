"""Configuration: one flat dataclass per recipe section, YAML recipes, dotted CLI overrides.

The one idea: a recipe is plain data. Every key is checked against the dataclass it lands in,
so a typo is an error that names the closest valid key instead of a silently ignored value.
A field's trailing comment is its `--help` text (read from the section's source).

The sections live by stage (data.py, model.py, train.py, align.py, compress.py, eval.py), the
whole recipe in recipe.py, the building blocks in base.py; this module is the package's API:
`from lmforge.config import X` for every public name.
"""

from lmforge.config.align import (
    LORA_TARGETS,
    DPOConfig,
    FileSourceConfig,
    GRPOConfig,
    LoRAConfig,
    PPOConfig,
    PreferenceDataConfig,
    PreferenceSourceConfig,
    RewardConfig,
    RolloutConfig,
    SFTConfig,
    SFTSourceConfig,
    as_lora,
)
from lmforge.config.base import (
    ConfigError,
    build,
    check_choice,
    check_positive,
    check_types,
    coerce,
    config_hash,
    field_help,
    resolve_path,
    section_name,
    to_dict,
    unknown_key_error,
    warn_deprecated,
)
from lmforge.config.compress import (
    GROUP_SIZES,
    PRUNE_METHODS,
    QUANT_METHODS,
    DistillConfig,
    PruneConfig,
    QuantizeConfig,
)
from lmforge.config.data import (
    CLEAN_STEPS,
    PII_TYPES,
    CleanConfig,
    DataConfig,
    SourceConfig,
    TokenizerConfig,
)
from lmforge.config.eval import QUANTIZED_NAME, RUN_MODELS, EvalConfig
from lmforge.config.model import (
    ARCH_FEATURES,
    MAX_LAYERS,
    ROPE_SCALING,
    BaseConfig,
    ModelConfig,
    check_model_fits,
    model_memory,
    physical_memory,
)
from lmforge.config.recipe import OLD_SECTIONS, RUNTIME_FIELDS, SECTIONS, Recipe, load_recipe
from lmforge.config.train import (
    PRETRAIN_ONLY,
    DistConfig,
    PretrainConfig,
    SampleConfig,
    TrainLoopConfig,
)

__all__ = [
    "ARCH_FEATURES",
    "CLEAN_STEPS",
    "GROUP_SIZES",
    "LORA_TARGETS",
    "MAX_LAYERS",
    "PII_TYPES",
    "PRETRAIN_ONLY",
    "PRUNE_METHODS",
    "QUANT_METHODS",
    "QUANTIZED_NAME",
    "ROPE_SCALING",
    "RUN_MODELS",
    "RUNTIME_FIELDS",
    "SECTIONS",
    "OLD_SECTIONS",
    "BaseConfig",
    "CleanConfig",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "DistillConfig",
    "DPOConfig",
    "EvalConfig",
    "FileSourceConfig",
    "GRPOConfig",
    "LoRAConfig",
    "ModelConfig",
    "PPOConfig",
    "PreferenceDataConfig",
    "PreferenceSourceConfig",
    "PretrainConfig",
    "PruneConfig",
    "QuantizeConfig",
    "Recipe",
    "RewardConfig",
    "RolloutConfig",
    "SampleConfig",
    "SFTConfig",
    "SFTSourceConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrainLoopConfig",
    "as_lora",
    "build",
    "check_choice",
    "check_model_fits",
    "check_positive",
    "check_types",
    "coerce",
    "config_hash",
    "field_help",
    "load_recipe",
    "model_memory",
    "physical_memory",
    "resolve_path",
    "section_name",
    "to_dict",
    "unknown_key_error",
    "warn_deprecated",
]
