"""`eval:` the report card `lmforge run` writes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmforge.config.base import ConfigError

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
