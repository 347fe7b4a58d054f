"""Shared fixtures: a micro recipe over slices of the bundled datasets, prepared once per session."""

from pathlib import Path

import pytest

from lmforge.config import load_recipe

REPO = Path(__file__).resolve().parents[1]

MICRO_RECIPE = """
data:
  sources:
    - {{name: enwiki, path: {d}/enwiki, format: jsonl, lang: en, max_docs: 150}}
    - {{name: tinystories, path: {d}/tinystories, split_on: blank_line, min_chars: 400, lang: en, max_docs: 100}}
    - {{name: zhwiki, path: {d}/chinese/zhwiki_sample.jsonl.gz, lang: zh, max_docs: 30}}
    - {{name: honglou, path: {d}/chinese/novel_honglou_meng.txt.gz, split_on: line, min_chars: 600, lang: zh, max_docs: 60}}
  val_fraction: 0.1
  num_workers: 2
tokenizer:
  vocab_size: 512
  sample_chars: 400000
model:
  dim: 32
  n_layer: 2
  n_head: 2
  max_seq_len: 64
pretrain:
  max_steps: 8
  batch_size: 4
  seq_len: 32
  warmup_steps: 2
  eval_every: 4
  eval_tokens: 2048
  log_every: 1
  save_every: 4
  keep_last: 5
sft:
  sources:
    - {{name: alpaca_en, path: {d}/sft/alpaca_en_demo.jsonl.gz, max_rows: 60}}
    - {{name: alpaca_zh, path: {d}/sft/alpaca_zh_demo.jsonl.gz, max_rows: 60}}
  max_steps: 4
  batch_size: 4
  seq_len: 64
  warmup_steps: 1
  eval_every: 2
  log_every: 1
  save_every: 2
  keep_last: 5
reward:
  sources:
    - {{name: hh, path: {d}/preference/hh_rlhf_harmless_base_1500.jsonl.gz, max_rows: 40}}
    - {{name: zh, path: {d}/preference/dpo_zh_demo.jsonl.gz, max_rows: 20}}
  max_steps: 3
  batch_size: 4
  seq_len: 64
  max_prompt_len: 32
  eval_every: 0
  save_every: 0
  log_every: 1
  val_fraction: 0.2
dpo:
  sources:
    - {{name: hh, path: {d}/preference/hh_rlhf_harmless_base_1500.jsonl.gz, max_rows: 40}}
  max_steps: 3
  batch_size: 4
  seq_len: 64
  max_prompt_len: 32
  eval_every: 0
  save_every: 0
  log_every: 1
  val_fraction: 0.2
  judge_prompts: 4
  judge_max_new_tokens: 8
sample:
  prompts: ["Once upon a time", "话说"]
  max_new_tokens: 8
  chat_prompts: ["Name a color."]
  chat_max_new_tokens: 6
eval:
  tasks: [mmlu, gsm8k]
  limit: 2
"""


@pytest.fixture(scope="session")
def micro_recipe_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "micro.yaml"
    path.write_text(MICRO_RECIPE.format(d=REPO / "datasets"), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def micro_prepared(micro_recipe_path, tmp_path_factory):
    """(recipe, run_dir) with tokenizer/ and data/ built once for every test that trains."""
    from lmforge.data import prepare
    from lmforge.tokenizer_train import run as train_tokenizer

    recipe = load_recipe(micro_recipe_path)
    run_dir = tmp_path_factory.mktemp("micro_run")
    train_tokenizer(recipe.tokenizer, recipe.data, recipe.base_dir, run_dir / "tokenizer")
    prepare.run(recipe.data, run_dir / "tokenizer", recipe.base_dir, run_dir / "data")
    return recipe, run_dir


@pytest.fixture(scope="session")
def micro_pretrained(micro_prepared, tmp_path_factory):
    """(recipe, model_dir): the micro recipe's model after its few pretraining steps."""
    from lmforge.train import pretrain

    recipe, run_dir = micro_prepared
    out = tmp_path_factory.mktemp("micro_pretrain")
    pretrain.run(recipe.pretrain, recipe.model, run_dir / "data", run_dir / "tokenizer", out)
    return recipe, out / "model"


@pytest.fixture(scope="session")
def micro_adapter(micro_pretrained, tmp_path_factory):
    """A LoRA adapter (r 4) on the micro model, its B matrices made up for the tests (nonzero,
    so that merging it changes the weights)."""
    import torch

    from lmforge.config import LoRAConfig
    from lmforge.model.load import load
    from lmforge.model.lora import apply_lora, save_adapter

    _, model_dir = micro_pretrained
    model, _ = load(model_dir)
    apply_lora(model, LoRAConfig(r=4), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("micro_adapter") / "adapter"
    save_adapter(model, out, str(model_dir))
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    """The imported SmolLM2-135M-Instruct directory, fetched beforehand (`.ci/run` does); the
    tests that need real weights skip without it: nothing downloads during the tests."""
    from lmforge.fetch import cache_dir, cached_model

    model_dir = cached_model("smollm2-135m-instruct")
    if model_dir is None:
        pytest.skip(
            f"SmolLM2-135M-Instruct is not in {cache_dir()}: run "
            "`lmforge fetch smollm2-135m-instruct` first (CI does)"
        )
    return model_dir


@pytest.fixture(scope="session")
def minilm_dir():
    """The all-MiniLM-L6-v2 sentence-embedding directory (a BERT encoder), fetched beforehand
    (`.ci/run` does); the tests that need it skip without it."""
    from lmforge.fetch import cache_dir, cached_model

    model_dir = cached_model("all-minilm-l6-v2")
    if model_dir is None:
        pytest.skip(
            f"all-MiniLM-L6-v2 is not in {cache_dir()}: run `lmforge fetch all-minilm-l6-v2` "
            "first (CI does)"
        )
    return model_dir
