"""GRPO: advantages and loss against hand computations, the arithmetic and GSM8K tasks as GRPO
encodes them (their checkers: tests/tasks/), a toy task the policy learns, and an interrupted
run that resumes exactly."""

import copy
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.align.grpo import (
    evaluate,
    grpo_advantages,
    grpo_loss,
    grpo_step,
    make_task,
    rollout_seed,
    run,
)
from lmforge.config import ConfigError, GRPOConfig, ModelConfig, build
from lmforge.data.readers import DataError
from lmforge.infer.cpu_decode import relayout
from lmforge.model.transformer import GPT
from lmforge.tasks.base import Problem, Task
from lmforge.tokenizer import Tokenizer
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import make_optimizer

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO / "datasets" / "eval" / "gsm8k" / "train_head300.jsonl.gz"

# --------------------------------------------------------------------------- the math


def test_advantages_match_a_hand_computation():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0.5, 0, 1, 0.5])
    got = grpo_advantages(rewards, 4)
    # group 1: mean 1/4, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    s1 = 0.5 + 1e-4
    # group 3: mean 1/2, deviations 0, -1/2, 1/2, 0: std sqrt(0.5 / 3)
    s3 = math.sqrt(0.5 / 3) + 1e-4
    want = [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1, 0, 0, 0, 0, 0, -0.5 / s3, 0.5 / s3, 0]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert torch.equal(got[4:8], torch.zeros(4))  # all-equal group: exactly zero, no signal


def test_loss_matches_a_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]])
    old = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.2, -9.0]])
    ref = torch.tensor([[-1.2, -2.5, -0.1], [-0.6, -1.0, -9.0]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # answer 2 has 2 tokens
    clip, beta = 0.2, 0.1
    loss, kl = grpo_loss(logp, old, ref, adv, mask, clip, beta)

    def token(lp, o, r, a):
        ratio = math.exp(lp - o)
        surrogate = min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
        k3 = math.exp(r - lp) - (r - lp) - 1
        return -surrogate + beta * k3, k3

    want_loss, want_kl = [], []
    for i, n in enumerate((3, 2)):
        terms = [
            token(logp[i, t].item(), old[i, t].item(), ref[i, t].item(), adv[i].item())
            for t in range(n)
        ]
        want_loss.append(sum(t[0] for t in terms) / n)
        want_kl.append(sum(t[1] for t in terms) / n)
    torch.testing.assert_close(loss, torch.tensor(want_loss), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl, torch.tensor(want_kl), rtol=1e-6, atol=1e-6)
    # answer 1, token 1 has ratio e^0.5 > 1.2 with A > 0: clipped, so it carries no gradient
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, old, ref, adv, mask, clip, 0.0)[0].sum().backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] != 0 and lp.grad[1, 2] == 0  # masked: none


def test_ratio_one_and_policy_equal_to_reference_give_the_plain_policy_gradient():
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.9], [0.3, 0.6, 0.1]])).requires_grad_(True)
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, kl = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, 0.2, kl_coef=0.5)
    assert torch.equal(kl, torch.zeros(2))
    torch.testing.assert_close(loss, -adv)  # ratio 1: the loss is -A whatever the tokens
    loss.sum().backward()  # d/dlogp = -A / |answer| on answer tokens: REINFORCE with a baseline
    want = torch.tensor([[-0.75, -0.75, 0.0], [0.5 / 3, 0.5 / 3, 0.5 / 3]])
    torch.testing.assert_close(logp.grad, want)


# --------------------------------------------------------------------------- arithmetic


def test_arithmetic_prompts_in_chat_and_plain_form(micro_pretrained):
    _, model_dir = micro_pretrained
    tok = Tokenizer.load(model_dir)
    plain = make_task(GRPOConfig(chat=False, eval_prompts=8), tok, ".", 64)
    chat = make_task(GRPOConfig(chat=True, eval_prompts=8), tok, ".", 64)
    p, c = plain.train(0)[0], chat.train(0)[0]
    assert p.text == c.text and p.answer == str(eval(p.text))
    assert tok.decode(p.prompt_ids[1:]) == f"{p.text}=" and p.prompt_ids[0] == tok.bos_id
    assert f"What is {c.text}?" in tok.decode(c.prompt_ids) and "assistant" in tok.decode(
        c.prompt_ids
    )
    # the checker decodes the answer tokens: the stop token is already gone
    assert plain.reward(p, tok.encode(" " + p.answer)) == 1.0
    assert plain.reward(p, tok.encode(p.answer + " apples")) == 0.0
    with pytest.raises(ConfigError, match="room for 3"):
        make_task(GRPOConfig(chat=True), tok, ".", 3)


# --------------------------------------------------------------------------- gsm8k


def test_gsm8k_task_is_scored_by_the_final_number(micro_pretrained, tmp_path):
    """GSM8K rows as a GRPO task (the rows themselves: tests/tasks/test_gsm8k.py)."""
    _, model_dir = micro_pretrained
    tok = Tokenizer.load(model_dir)
    cfg = GRPOConfig(task="gsm8k", path=str(GSM8K), chat=False, eval_prompts=5, prompts_per_step=3)
    task = make_task(cfg, tok, ".", 1000)
    assert len(task.eval) == 5 and task.info["train_rows"] + task.info["eval_rows"] == 300
    assert {p.text for p in task.eval}.isdisjoint(p.text for s in range(20) for p in task.train(s))
    p = task.train(0)[0]
    assert tok.decode(p.prompt_ids[1:]).startswith("Question: ")
    assert task.reward(p, tok.encode(f"so the answer is {p.answer}.")) == 1.0
    assert task.reward(p, tok.encode(f"{p.answer} + 1 = {int(float(p.answer)) + 1}")) == 0.0
    # questions too long for seq_len - max_new_tokens are dropped and counted, never cut
    short = make_task(cfg, tok, ".", 150).info  # about half the questions fit in 150 tokens
    assert 50 < short["too_long"] < 250 and short["train_rows"] + short["eval_rows"] < 250
    with pytest.raises(DataError, match="no training rows .300 longer than seq_len"):
        make_task(cfg, tok, ".", 60)


def test_bad_config_values_are_named():
    for values, message in [
        ({"group_size": 1}, "group_size must be >= 2"),
        ({"ops": "+/"}, "ops must be made of"),
        ({"task": "gsm8k"}, "needs grpo.path"),
        ({"task": "mmlu"}, "task must be one of"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"digits": 0}, "digits must be positive"),
        ({"group_sise": 4}, "did you mean 'group_size'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build(GRPOConfig, values, "grpo")


def test_run_refuses_a_context_longer_than_the_model_and_a_missing_file(micro_pretrained, tmp_path):
    _, model_dir = micro_pretrained  # max_seq_len 64
    with pytest.raises(ConfigError, match=r"seq_len \(256\) exceeds the model's context \(64\)"):
        run(GRPOConfig(), model_dir, tmp_path / "a")
    cfg = GRPOConfig(task="gsm8k", path="no/such.jsonl", seq_len=64)
    with pytest.raises(DataError, match="grpo.path: file not found: no/such.jsonl"):
        run(cfg, model_dir, tmp_path / "b")


# --------------------------------------------------------------------------- learning


@pytest.fixture
def one_thread():
    """A toy model's matmuls are too small to share: one thread is faster, and far faster on
    a machine whose cores are busy with other work (OpenMP threads then wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _successor_task(vocab: int, prompts: int) -> Task:
    """Answer token x with x + 1 (tokens 4..vocab-1, wrapping round). A random policy samples
    it one time in `vocab`; greedy, a random model with tied embeddings repeats x instead."""

    def successor(x: int) -> int:
        return 4 + (x - 3) % (vocab - 4)

    def train(step: int) -> list[Problem]:
        rng = np.random.default_rng([0, step])
        return [Problem(str(x), [2, int(x)], "") for x in rng.integers(4, vocab, prompts)]

    return Task(
        "successor",
        train,
        [Problem(str(x), [2, x], "") for x in range(4, vocab)],
        lambda p, ids: float(bool(ids) and ids[0] == successor(p.prompt_ids[-1])),
    )


def test_grpo_teaches_a_random_model_a_toy_task(one_thread):
    vocab = 16
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=vocab, dim=32, n_layer=1, n_head=2, max_seq_len=32))
    ref = copy.deepcopy(policy).requires_grad_(False)
    cfg = GRPOConfig(group_size=8, prompts_per_step=8, max_new_tokens=1, lr=1e-2, batch_size=64)
    relayout(policy)
    optimizer = make_optimizer(policy, cfg, torch.device("cpu"))  # constant lr: cfg.lr
    task = _successor_task(vocab, cfg.prompts_per_step)
    before, _ = evaluate(policy, task, 1, (1,))
    rewards, kls = [], []
    for step in range(40):
        seed = rollout_seed(cfg.seed, step, 64)
        stats = grpo_step(policy, ref, optimizer, task, task.train(step), cfg, seed, 0, (1,))
        rewards.append(stats["reward"])
        kls.append(stats["kl"])
    assert np.mean(rewards[:5]) < 0.1 and np.mean(rewards[-8:]) > 0.4, str(rewards)
    after, _ = evaluate(policy, task, 1, (1,))  # greedy, on all 12 prompts
    assert before <= 1 / 12 and after >= 0.5, (before, after)
    assert kls[0] == 0 and kls[-1] > 0  # the policy starts at the reference, then leaves it


def test_an_interrupted_run_resumes_exactly(micro_pretrained, tmp_path):
    """Ctrl-C during step 2 (a real SIGINT): the run saves after that step; running the same
    command again finishes with the metrics and weights of an uninterrupted run."""
    _, model_dir = micro_pretrained
    tok = Tokenizer.load(model_dir)
    cfg = GRPOConfig(
        max_steps=4, prompts_per_step=2, group_size=4, max_new_tokens=4, seq_len=64, lr=1e-3,
        warmup_steps=2, log_every=1, eval_every=2, save_every=0, iterations=2, batch_size=3,
    )  # fmt: skip
    words = ["Once", "The cat", "Hello", "A dog", "Rain", "Sun", "Tree", "Blue"]

    def task(interrupt_at: int | None) -> Task:
        def train(step: int) -> list[Problem]:
            if step == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            picked = np.random.default_rng(step).choice(len(words), 2, replace=False)
            return [Problem(words[i], [tok.bos_id, *tok.encode(words[i])], "") for i in picked]

        # a reward the micro model earns about half the time, so every step updates the policy
        return Task(
            "parity", train, [Problem(w, [tok.bos_id, *tok.encode(w)], "") for w in words[:4]],
            lambda p, ids: float(bool(ids) and ids[0] % 2 == 0),
        )  # fmt: skip

    full = run(cfg, model_dir, tmp_path / "full", task=task(None))
    assert not full["interrupted"] and full["step"] == 4
    half = run(cfg, model_dir, tmp_path / "resumed", task=task(1))
    assert half["interrupted"] and half["step"] == 2
    assert not (tmp_path / "resumed" / "model").exists()
    resumed = run(cfg, model_dir, tmp_path / "resumed", task=task(None))
    assert resumed["step"] == 4 and not resumed["interrupted"]

    def rows(name):
        return [
            {k: v for k, v in r.items() if k != "s_per_step"}
            for r in read_metrics(tmp_path / name / "metrics.jsonl")
        ]

    assert rows("full") == rows("resumed")
    assert [r["step"] for r in rows("full") if "val_accuracy" in r] == [0, 2, 4]
    assert any(r.get("grad_norm", 0) > 0 for r in rows("full"))  # it did learn something
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("curves.png", "summary.json", "model/tokenizer.json", "model/config.json"):
        assert (tmp_path / "full" / f).exists(), f


def test_run_on_arithmetic_writes_model_curves_and_a_headline(micro_pretrained, tmp_path):
    _, model_dir = micro_pretrained
    cfg = GRPOConfig(
        max_steps=2, prompts_per_step=2, group_size=2, max_new_tokens=3, seq_len=64,
        eval_prompts=6, eval_every=0, log_every=1,
    )  # fmt: skip
    s = run(cfg, model_dir, tmp_path)
    assert s["step"] == 2 and not s["interrupted"] and s["task"] == "arithmetic"
    assert s["headline"].startswith("held-out accuracy ") and "in 2 steps" in s["headline"]
    assert s["eval_prompts"] == 6 and len(s["examples"]) == 6
    assert json.loads((tmp_path / "summary.json").read_text())["headline"] == s["headline"]
    train_rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    keys = {"reward", "accuracy", "kl", "loss", "answer_len", "stopped", "groups_with_signal"}
    assert keys | {"s_per_step", "lr"} <= train_rows[0].keys()
    assert all(1 <= r["answer_len"] <= 4 for r in train_rows)  # 3 tokens and maybe a stop
    assert (tmp_path / "model" / "model.safetensors").exists() and (
        tmp_path / "curves.png"
    ).exists()


def test_cold_start_learns_the_answers_and_becomes_the_reference(micro_pretrained, tmp_path):
    """Supervised cold start on training problems lowers their answer loss, is saved once
    (a rerun reuses it) and is where the RL run starts: held-out and training accuracy are
    both reported."""
    _, model_dir = micro_pretrained
    cfg = GRPOConfig(
        max_steps=1, prompts_per_step=8, group_size=2, max_new_tokens=3, seq_len=64, chat=False,
        eval_prompts=6, eval_every=0, log_every=1, cold_start_steps=30, cold_start_lr=3e-3,
    )  # fmt: skip
    s = run(cfg, model_dir, tmp_path)
    log = json.loads((tmp_path / "cold_start" / "cold_start.json").read_text())
    assert len(log["losses"]) == 30
    assert sum(log["losses"][-5:]) < 0.7 * sum(log["losses"][:5]), log["losses"]
    assert s["val_accuracy_base"] == log["val_accuracy_base"] and s["cold_start_steps"] == 30
    assert "before the 30-step cold start" in s["headline"] and "training problems" in s["headline"]
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train_accuracy" in r]
    assert evals[0]["step"] == 0 and 0 <= evals[0]["train_accuracy"] <= 1
    with pytest.raises(ConfigError, match="cold_start"):
        GRPOConfig(cold_start_steps=-1)
