"""Where the stages connect: one row per stage, in the order `lmforge run` runs them.

The one idea: stage NAME keeps everything in OUT/NAME, and a stage that makes a model writes it
to OUT/NAME/model, or OUT/NAME/adapter when it trained LoRA adapters (`output_dir` is the one
place that decides which). A stage started on its own (`lmforge dpo`) reads by default what an
earlier stage wrote: the row's `model_from`. The CLI (subcommands, default inputs, dispatch),
the pipeline (order, hashes) and the report read this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    """One stage of a run: where its config, command, input and output are."""

    name: str  # its folder OUT/<name>, its key in the stage hashes and in `lmforge run --force`
    section: str = ""  # the recipe section it reads ("" = none)
    command: str = ""  # its `lmforge` subcommand ("" = it runs only inside `lmforge run`)
    family: str = ""  # align | compress: the CLI calls lmforge.<family>.<name>.run the same way
    model_from: str = ""  # the stage whose model it starts from by default ("" = none)
    data: bool = False  # it reads prepared shards (default OUT/data)
    adapts: bool = False  # it may train LoRA adapters (its section's `lora`): then writes adapter/
    dist: bool = False  # torchrun can run it over several processes (--dist.*)
    in_run: bool = True  # `lmforge run` runs it (when the recipe asks for it)
    title: str = ""  # its model's column in the report ("" = the run compares no model of it)
    help: str = ""  # the subcommand's one-line help


TABLE = (
    Stage("base", "base", title="base model"),
    Stage(
        "clean",
        "clean",
        "clean",
        help="clean the recipe's data: normalize, language, quality, toxicity, pii, exact and "
        "near-duplicate removal, in parallel over shards (writes OUT/clean with report.md; "
        "tokenizer and prepare then read it)",
    ),
    Stage(
        "tokenizer",
        "tokenizer",
        "tokenizer",
        help="train the byte-level BPE tokenizer on the recipe's data (writes OUT/tokenizer)",
    ),
    Stage(
        "data",
        "data",
        "prepare",
        help="tokenize the recipe's data into shards (writes OUT/data; needs OUT/tokenizer)",
    ),
    Stage(
        "pretrain",
        "pretrain",
        "pretrain",
        data=True,
        dist=True,
        title="pretrained model",
        help="pretrain the model on prepared shards (writes OUT/pretrain; needs OUT/data, "
        "OUT/tokenizer)",
    ),
    Stage(
        "sft",
        "sft",
        "sft",
        model_from="pretrain",
        adapts=True,
        dist=True,
        title="after SFT",
        help="instruction-tune a model on chat data, fully or with LoRA (--lora.r 8); writes "
        "OUT/sft/model, or OUT/sft/adapter with LoRA",
    ),
    Stage(
        "reward",
        "reward",
        "reward",
        "align",
        model_from="sft",
        dist=True,
        help="train a reward model on preference pairs (Bradley-Terry); writes OUT/reward/model "
        "(a LlamaForSequenceClassification-style checkpoint)",
    ),
    Stage(
        "dpo",
        "dpo",
        "dpo",
        "align",
        model_from="sft",
        adapts=True,
        dist=True,
        title="after DPO",
        help="align a chat model to preference pairs with DPO against a frozen reference; "
        "writes OUT/dpo/model (OUT/dpo/adapter with --lora.r)",
    ),
    Stage(
        "ppo",
        "ppo",
        "ppo",
        "align",
        model_from="sft",
        in_run=False,
        help="RLHF: PPO against a reward model (or the qa checker), KL-penalised to the "
        "reference; writes OUT/ppo/model",
    ),
    Stage(
        "grpo",
        "grpo",
        "grpo",
        "align",
        model_from="sft",
        in_run=False,
        help="GRPO with a verifiable reward (built-in arithmetic, or GSM8K); writes OUT/grpo/model",
    ),
    Stage(
        "quantize",
        "quantize",
        "quantize",
        "compress",
        model_from="pretrain",
        data=True,
        help="weight-only quantization (int8, int4 round-to-nearest, or GPTQ int4) of a model; "
        "writes OUT/quantize/<method> (generate, chat, serve and eval load it)",
    ),
    Stage(
        "distill",
        "distill",
        "distill",
        "compress",
        model_from="pretrain",
        data=True,
        in_run=False,
        dist=True,
        help="train a smaller student on a teacher's logits (and the same student without the "
        "teacher, for comparison); writes OUT/distill/model",
    ),
    Stage(
        "prune",
        "prune",
        "prune",
        "compress",
        model_from="pretrain",
        data=True,
        in_run=False,
        dist=True,
        help="prune a model (magnitude, 2:4 or structured heads/channels), then optionally "
        "recover with a short fine-tune; writes OUT/prune/<method>",
    ),
    Stage("sample", "sample"),
    Stage("eval", "eval"),
)
BY_NAME = {s.name: s for s in TABLE}
BY_COMMAND = {s.command: s for s in TABLE if s.command}
# what `lmforge run` runs, in order (ppo, grpo, distill and prune run only on their own)
RUN_ORDER = tuple(s.name for s in TABLE if s.in_run)
# the stages whose models a run compares side by side (eval.models, the report's columns)
MODEL_STAGES = tuple(s.name for s in TABLE if s.title)


def output_dir(out: Path, name: str, lora_r: int | None = None) -> Path:
    """The model stage `name` of run directory `out` wrote: OUT/<name>/adapter after training
    LoRA adapters, else OUT/<name>/model. Given the stage's `lora_r` (its config) that decides;
    without, a finished stage's folder does (OUT/<name>/model when neither exists yet, so that
    an error names the usual one)."""
    model, adapter = Path(out) / name / "model", Path(out) / name / "adapter"
    if lora_r is not None:
        return adapter if lora_r else model
    return adapter if adapter.is_dir() and not model.is_dir() else model
