"""The first losses of every training stage on the micro recipe, pinned.

These numbers were measured on the code before the stages moved onto one training clock
(`train/loop.py`); a refactor that changes what a stage computes, the order it reads data in or
how it seeds its RNGs changes them, and this file says which stage moved. Tolerances allow for
another CPU's float rounding (relative 1e-4 after a few optimizer steps), not for a changed step.

Each stage runs with one thread (thread count changes reduction order) on the session's micro
model (itself pinned by the pretrain case).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import (
    DistillConfig,
    DPOConfig,
    GRPOConfig,
    LoRAConfig,
    PPOConfig,
    PreferenceSourceConfig,
    PruneConfig,
    RewardConfig,
)
from lmforge.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
HH = str(REPO / "datasets/preference/hh_rlhf_harmless_base_1500.jsonl.gz")
DPO_EN = str(REPO / "datasets/preference/dpo_en_demo.jsonl.gz")

# stage -> (metric, first values); measured before the migration to train/loop.py
PINNED = {
    "pretrain": ("loss", [6.261363506317139, 6.233419418334961, 6.237828254699707]),
    "sft": ("loss", [6.218128269001589, 6.1483289501335046, 6.162350494082611]),
    "reward": ("loss", [0.6822285652160645, 0.6800719499588013, 0.7643523216247559]),
    "dpo": ("loss", [0.6931471824645996, 0.6929833292961121, 0.6881964206695557]),
    "ppo": ("pg_loss", [-0.046338703483343124, -0.02845318429172039, -0.02459133043885231]),
    "grpo": ("loss", [-0.01588412366800185, -0.02085111290216446, -0.002721480504987994]),
    "distill": ("loss", [3.12752103805542, 3.126009702682495, 3.1255416870117188]),
    "prune": ("loss", [5.941220283508301, 6.0153350830078125, 5.978941440582275]),
    # masked-LM pretraining of a micro encoder (model.arch bert), added after the migration
    "pretrain_mlm": ("loss", [6.202660454644097, 6.253471374511719, 6.19586669921875]),
}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _first(out: Path, metric: str, n: int = 3) -> list[float]:
    return [r[metric] for r in read_metrics(out / "metrics.jsonl") if metric in r][:n]


def _check(stage: str, out: Path) -> None:
    metric, want = PINNED[stage]
    got = _first(out, metric, len(want))
    print(json.dumps({stage: got}))  # the figures to pin, when a change is intended
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6), f"{stage}: first {metric} moved"


def test_pretrain(micro_prepared, tmp_path):
    from lmforge.train import pretrain

    recipe, run_dir = micro_prepared
    pretrain.run(recipe.pretrain, recipe.model, run_dir / "data", run_dir / "tokenizer", tmp_path)
    _check("pretrain", tmp_path)


def test_pretrain_mlm_through_the_cli(micro_recipe_path, micro_prepared, tmp_path):
    """`lmforge pretrain` with an encoder config (the micro recipe's model as model.arch bert),
    in a subprocess as a user runs it."""
    _, run_dir = micro_prepared
    encoder = dict(arch="bert", norm="layernorm", mlp="gelu", pos="learned", qkv_bias="true",
                   bias="true")  # fmt: skip
    cli = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(micro_recipe_path)]
    cli += ["--data-dir", str(run_dir / "data"), "--tokenizer-dir", str(run_dir / "tokenizer")]
    cli += ["--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--max_steps", "3"]
    cli += [
        "--eval_every",
        "0",
        "--save_every",
        "0",
        *(f"--model.{k}={v}" for k, v in encoder.items()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    _check("pretrain_mlm", tmp_path / "pretrain")


def test_sft(micro_pretrained, tmp_path):
    from lmforge.align import sft

    recipe, model_dir = micro_pretrained
    sft.run(recipe.sft, LoRAConfig(), model_dir, tmp_path, recipe.base_dir)
    _check("sft", tmp_path)


PAIRS = dict(
    max_steps=3, batch_size=4, seq_len=64, max_prompt_len=32, lr=1e-3, warmup_steps=1,
    eval_every=0, save_every=0, log_every=1, val_fraction=0.2, device="cpu",
)  # fmt: skip


def test_reward(micro_pretrained, tmp_path):
    from lmforge.align import reward

    _, model_dir = micro_pretrained
    src = [PreferenceSourceConfig(path=HH, max_rows=40)]
    reward.run(RewardConfig(sources=src, **PAIRS), model_dir, tmp_path)
    _check("reward", tmp_path)


def test_dpo(micro_pretrained, tmp_path):
    from lmforge.align import dpo

    _, model_dir = micro_pretrained
    src = [PreferenceSourceConfig(path=HH, max_rows=40)]
    cfg = DPOConfig(sources=src, judge_prompts=0, **PAIRS)
    dpo.run(cfg, LoRAConfig(), model_dir, tmp_path)
    _check("dpo", tmp_path)


def test_ppo(micro_pretrained, tmp_path):
    from lmforge.align import ppo
    from lmforge.align.reward import RewardModel, save_reward_model
    from lmforge.io import atomic_dir
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    _, model_dir = micro_pretrained
    torch.manual_seed(0)
    rm = RewardModel(load_model(model_dir))
    torch.nn.init.normal_(rm.score.weight, 0.0, 1.0)
    with atomic_dir(tmp_path / "rm") as d:
        save_reward_model(rm, d, model_dir, Tokenizer.load(model_dir).pad_id)
    cfg = PPOConfig(
        sources=[{"name": "dpo_en", "path": DPO_EN, "max_rows": 30}],
        reward_model=str(tmp_path / "rm"), max_steps=3, prompts_per_step=4, minibatch_size=2,
        ppo_epochs=2, max_new_tokens=8, seq_len=64, eval_prompts=3, val_fraction=0.2, lr=1e-3,
        warmup_steps=0, schedule="constant", log_every=1, eval_every=0, save_every=0,
        device="cpu", threads=1,
    )  # fmt: skip
    ppo.run(cfg, model_dir, tmp_path / "ppo")
    _check("ppo", tmp_path / "ppo")


def test_grpo(micro_pretrained, tmp_path):
    """With a made-up reward the micro model earns about half the time (an even first token),
    so every step has a gradient (the arithmetic task's reward is 0 for a micro model)."""
    import numpy as np

    from lmforge.align.grpo import run
    from lmforge.tasks.base import Problem, Task
    from lmforge.tokenizer import Tokenizer

    _, model_dir = micro_pretrained
    tok = Tokenizer.load(model_dir)
    words = ["Once", "The cat", "Hello", "A dog", "Rain", "Sun", "Tree", "Blue"]

    def problem(w: str) -> Problem:
        return Problem(w, [tok.bos_id, *tok.encode(w)], "")

    def train(step: int) -> list[Problem]:
        picked = np.random.default_rng(step).choice(len(words), 2, replace=False)
        return [problem(words[i]) for i in picked]

    task = Task(
        "parity", train, [problem(w) for w in words[:4]],
        lambda p, ids: float(bool(ids) and ids[0] % 2 == 0),
    )  # fmt: skip
    cfg = GRPOConfig(
        max_steps=3, prompts_per_step=2, group_size=4, max_new_tokens=4, seq_len=64, lr=1e-3,
        warmup_steps=1, eval_every=0, log_every=1, save_every=0, iterations=2, batch_size=3,
    )  # fmt: skip
    run(cfg, model_dir, tmp_path, task=task)
    _check("grpo", tmp_path)


def test_distill(micro_prepared, micro_pretrained, tmp_path):
    from lmforge.compress import distill

    _, run_dir = micro_prepared
    _, model_dir = micro_pretrained
    cfg = DistillConfig(
        dim=16, max_steps=3, batch_size=4, seq_len=32, warmup_steps=1, eval_every=0,
        eval_tokens=1024, log_every=1, save_every=0, device="cpu",
    )  # fmt: skip
    distill.run(cfg, model_dir, run_dir / "data", tmp_path)
    _check("distill", tmp_path)


def test_prune(micro_prepared, micro_pretrained, tmp_path):
    from lmforge.compress import prune

    _, run_dir = micro_prepared
    _, model_dir = micro_pretrained
    cfg = PruneConfig(
        method="magnitude", sparsity=0.5, max_steps=3, warmup_steps=1, eval_every=0,
        batch_size=4, seq_len=32, eval_tokens=1024, log_every=1, device="cpu",
    )  # fmt: skip
    prune.run(cfg, model_dir, run_dir / "data", tmp_path)
    _check("prune", tmp_path / "magnitude")
