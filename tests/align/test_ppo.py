"""PPO: GAE against a plain loop, the KL-shaped rewards, the clipped losses by hand, the KL
controller, prompt rows named by line (the qa checker: tests/tasks/test_qa.py), and short runs
on the micro model that train, save a loadable model and resume to the same weights."""

import gzip
import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from lmforge.align import ppo
from lmforge.align.reward import RewardModel, save_reward_model
from lmforge.align.rollout import token_logprobs
from lmforge.config import ConfigError, ModelConfig, PPOConfig, PreferenceSourceConfig
from lmforge.data.readers import DataError
from lmforge.io import atomic_dir
from lmforge.model.checkpoint import TOKENIZER_FILES, load_model
from lmforge.model.transformer import GPT
from lmforge.tasks.qa import UNANSWERABLE
from lmforge.tokenizer import Tokenizer
from lmforge.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]

# two rows of 6 target positions: answers at 2..4 and 1..5 (the prompt before, padding after)
MASK = torch.tensor(
    [[False, False, True, True, True, False], [False, True, True, True, True, True]]
)
REWARDS = torch.tensor([[9.0, 9.0, 0.1, -0.2, 1.5, 9.0], [9.0, 0.3, 0.0, -0.1, 0.2, -1.0]])
VALUES = torch.tensor([[9.0, 9.0, 0.5, 0.4, 0.3, 9.0], [9.0, -0.2, 0.1, 0.6, -0.3, 0.2]])


def test_gae_equals_a_plain_loop_over_each_answer():
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae(REWARDS, VALUES, MASK, gamma, lam)
    want_adv, want_ret = torch.zeros(2, 6), torch.zeros(2, 6)
    for i in range(2):
        pos = [t for t in range(6) if MASK[i, t]]
        running = 0.0
        for k in reversed(range(len(pos))):
            t = pos[k]
            next_value = VALUES[i, pos[k + 1]].item() if k + 1 < len(pos) else 0.0
            delta = REWARDS[i, t].item() + gamma * next_value - VALUES[i, t].item()
            running = delta + gamma * lam * running
            want_adv[i, t] = running
            want_ret[i, t] = running + VALUES[i, t].item()
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)
    # gamma = lam = 1: the advantage is the reward-to-go minus the value
    adv, _ = ppo.gae(REWARDS, VALUES, MASK, 1.0, 1.0)
    assert adv[0, 2].item() == pytest.approx(0.1 - 0.2 + 1.5 - 0.5)


def test_whiten_gives_zero_mean_unit_variance_on_the_mask():
    x = ppo.whiten(REWARDS, MASK)
    vals = x[MASK]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.pow(2).mean().item() == pytest.approx(1.0, abs=1e-5)
    assert (x[~MASK] == 0).all()
    kept = ppo.whiten(REWARDS, MASK, shift_mean=False)[MASK]
    assert kept.mean().item() == pytest.approx(REWARDS[MASK].mean().item(), abs=1e-5)


def test_kl_term_vanishes_when_the_policy_is_the_reference():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, dim=32, n_layer=2, n_head=2, max_seq_len=32)).eval()
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        logp = token_logprobs(model, ids)
        ref = token_logprobs(model, ids)
    score = torch.tensor([0.7, -1.3])
    rewards, kl = ppo.per_token_rewards(score, logp, ref, MASK, kl_coef=0.5)
    want = torch.zeros(2, 6)
    want[0, 4], want[1, 5] = 0.7, -1.3  # each row's last answer token
    assert torch.equal(kl, torch.zeros(2, 6))
    torch.testing.assert_close(rewards, want, rtol=0, atol=0)
    # another reference: -coef * (logp - ref) at answer tokens, the score on top at the last one
    other = ref - torch.linspace(0, 1, 6)
    rewards, kl = ppo.per_token_rewards(score, logp, other, MASK, kl_coef=0.5)
    torch.testing.assert_close(kl, (logp - other) * MASK)
    torch.testing.assert_close(rewards, -0.5 * (logp - other) * MASK + want)


def test_clipped_losses_by_hand():
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1; the last position is padding,
    # whose log-prob is arbitrary (exp(1e4) is inf: it must not turn the means into nan)
    old = torch.zeros(1, 5)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]]))
    logp[0, 4] = 1e4
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0]])  # GAE leaves 0 at padding
    mask = torch.tensor([[True, True, True, True, False]])
    values = torch.tensor([[1.0, 0.1, 0.0, -0.5, 5.0]])
    old_values = torch.zeros(1, 5)
    returns = torch.tensor([[0.5, 1.0, 0.0, 0.0, 0.0]])
    pg, vf, stats = ppo.ppo_losses(logp, old, values, old_values, adv, returns, mask, 0.2, 0.2)
    # max(-A r, -A clip(r)): -1.2 (gain capped), -0.5, 0.8 (clip bounds the loss from below), 1.5
    assert pg.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    # value: max((v - R)^2, (clip(v, old +- 0.2) - R)^2) / 2
    # v=1 -> 0.25 vs (0.2-0.5)^2 = 0.09; v=0.1 -> 0.81 both; v=0 -> 0; v=-0.5 -> 0.25 vs 0.04
    assert vf.item() == pytest.approx(0.5 * (0.25 + 0.81 + 0.0 + 0.25) / 4)
    assert stats["clipfrac"].item() == 1.0  # every ratio is 0.5 from 1
    assert stats["vf_clipfrac"].item() == 0.5
    # approx_kl is k3 of KL(old || new): exp(new - old) - (new - old) - 1, averaged
    r = torch.tensor([1.5, 0.5, 0.5, 1.5])
    assert stats["approx_kl"].item() == pytest.approx((r - r.log() - 1).mean().item(), rel=1e-6)
    # no value clipping: the plain squared error
    _, vf0, _ = ppo.ppo_losses(logp, old, values, old_values, adv, returns, mask, 0.2, 0.0)
    assert vf0.item() == pytest.approx(0.5 * (0.25 + 0.81 + 0.0 + 0.25) / 4)
    _, vf1, _ = ppo.ppo_losses(logp, old, values, torch.ones(1, 5), adv, returns, mask, 0.2, 0.2)
    # old values 1: v=1 unclipped; v=0.1 -> clip 0.8 (0.04 < 0.81); v=0 -> 0.8 (0.64 > 0);
    # v=-0.5 -> 0.8 (0.64 > 0.25)
    assert vf1.item() == pytest.approx(0.5 * (0.25 + 0.81 + 0.64 + 0.64) / 4)


def test_adaptive_kl_moves_the_coefficient_towards_the_target():
    up = ppo.AdaptiveKL(0.1, target=6.0, horizon=1000)
    assert up.update(9.0, 100) == pytest.approx(0.1 * (1 + 0.5 * 0.1 * 0.4))  # error 0.5 -> 0.2
    down = ppo.AdaptiveKL(0.1, target=6.0, horizon=1000)
    assert down.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 0.1))  # error -0.1
    before = down.value
    assert down.update(-3.0, 100) == pytest.approx(before * (1 - 0.2 * 0.1))  # clipped at -0.2
    on = ppo.AdaptiveKL(0.1, target=6.0, horizon=1000)
    assert on.update(6.0, 100) == 0.1


def test_prompt_rows_in_every_layout():
    hh = {
        "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: A pear.",
        "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: No.",
    }
    sharegpt = {
        "conversations": [{"from": "human", "value": "Name a fruit."}],
        "chosen": {"from": "gpt", "value": "A pear."},
        "rejected": {"from": "gpt", "value": "No."},
    }
    plain = {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "No."}
    only = {"prompt": [{"role": "user", "content": "Name a fruit."}]}
    want = [{"role": "user", "content": "Name a fruit."}]
    for row in (hh, sharegpt, plain, only, {"prompt": "Name a fruit."}):
        assert ppo.row_to_prompt(row).messages == want
    qa = ppo.row_to_prompt({"question": "2+2?", "answer": "4"}, "qa", system_prompt="Be brief.")
    assert qa.messages[0] == {"role": "system", "content": "Be brief."} and qa.answer == "4"
    gsm = ppo.row_to_prompt({"question": "q", "answer": "6 * 7 = 42\n#### 42"}, "qa")
    assert gsm.answer == "42"
    assert ppo.row_to_prompt({"prompt": "q", "answer": 7}, "qa").answer == "7"


@pytest.mark.parametrize(
    "row, reward, message",
    [
        ({"text": "hi"}, "model", "a row needs 'prompt'"),
        ({"prompt": 3}, "model", "'prompt' must be a string"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "x", "content": "b"}]}, "model",
         r"prompt\[1\]: role"),
        ({"prompt": [{"role": "assistant", "content": "a"}]}, "model", "end with a user turn"),
        ({"question": "q"}, "qa", "missing field 'answer'"),
        ({"answer": "a"}, "qa", "missing field 'question'"),
        ({"question": "q", "answer": ["a"]}, "qa", "'answer' must be a string or a number"),
        ({"question": "q", "answer": " ?! "}, "qa", "'answer' is empty"),
    ],
)  # fmt: skip
def test_bad_rows_are_named(row, reward, message):
    with pytest.raises(ValueError, match=message):
        ppo.row_to_prompt(row, reward)


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = ['{"prompt": "one"}', "", '{"prompt": "two"}', '{"prompt": ""}', "{nope"]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    src = PreferenceSourceConfig(name="p", path=str(path))
    with pytest.raises(DataError, match=re.escape(f"{path}:4: field 'prompt' is empty")):
        ppo.read_prompts(src, ".")
    prompts, problems = ppo.read_prompts(src, ".", skip_bad_rows=True)
    assert [p.messages[0]["content"] for p in prompts] == ["one", "two"]
    assert len(problems) == 2 and problems[1].startswith(f"{path}:5: invalid JSON")


def test_prompt_plan_is_a_pure_function_of_the_step():
    n, per = 10, 4
    plan = [ppo.prompt_plan(n, per, seed=3, step=s) for s in range(5)]
    assert plan == [ppo.prompt_plan(n, per, seed=3, step=s) for s in range(5)]
    flat = [i for p in plan for i in p]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert plan != [ppo.prompt_plan(n, per, seed=4, step=s) for s in range(5)]


def test_config_checks():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        PPOConfig(seq_len=64, max_new_tokens=64)
    with pytest.raises(ConfigError, match="value_clip"):
        PPOConfig(value_clip=-1)
    with pytest.raises(ConfigError, match="correct_reward > abstain_reward"):
        PPOConfig(abstain_reward=2.0)


# --------------------------------------------------------------------------- runs


@pytest.fixture(autouse=True)
def _restore_threads():
    """The runs use one thread (a micro model gains nothing from two, and loses much when the
    cores are shared); torch's thread count is global, so put it back for later tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reward_dir(micro_pretrained, tmp_path_factory):
    """A reward model on the micro model's backbone, its head seeded (untrained: any fixed
    function of the answer is something for PPO to climb)."""
    _, model_dir = micro_pretrained
    torch.manual_seed(0)
    rm = RewardModel(load_model(model_dir))
    torch.nn.init.normal_(rm.score.weight, 0.0, 1.0)
    out = tmp_path_factory.mktemp("rm") / "model"
    with atomic_dir(out) as d:
        save_reward_model(rm, d, model_dir, Tokenizer.load(model_dir).pad_id)
    assert all((out / f).exists() for f in TOKENIZER_FILES if (model_dir / f).exists())
    return out


def _cfg(reward_dir, **kw) -> PPOConfig:
    src = {"name": "dpo_en", "path": str(REPO / "datasets/preference/dpo_en_demo.jsonl.gz")}
    base = dict(
        sources=[{**src, "max_rows": 30}],
        reward_model=str(reward_dir),
        max_steps=2,
        prompts_per_step=4,
        minibatch_size=2,
        ppo_epochs=2,
        max_new_tokens=8,
        seq_len=64,
        eval_prompts=3,
        val_fraction=0.2,
        lr=1e-3,
        warmup_steps=0,
        schedule="constant",
        log_every=1,
        eval_every=1,
        save_every=1,
        keep_last=5,
        device="cpu",
        threads=1,
    )
    return PPOConfig(**{**base, **kw})


def test_run_trains_saves_and_reloads(micro_pretrained, reward_dir, tmp_path):
    _, model_dir = micro_pretrained
    s = ppo.run(_cfg(reward_dir), model_dir, tmp_path / "ppo")
    assert s["step"] == 2 and not s["interrupted"] and s["prompts"]["eval"] == 3
    for name in ("metrics.jsonl", "summary.json", "curves.png", "samples.jsonl"):
        assert (tmp_path / "ppo" / name).exists()
    assert "held-out reward" in s["headline"] and "KL to the reference" in s["headline"]
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    trained = [r for r in rows if "kl" in r]
    assert [r["step"] for r in trained] == [1, 2]
    for r in trained:
        for k in ("reward", "kl", "kl_coef", "pg_loss", "vf_loss", "approx_kl"):
            assert math.isfinite(r[k]), k
    # step 1 samples from the reference itself, so its sampled KL is exactly 0
    assert trained[0]["kl"] == 0.0 and trained[1]["kl"] != 0.0
    assert [r["step"] for r in rows if "val_reward" in r] == [0, 1, 2]
    assert s["before"]["val_kl"] == 0.0 and s["after"]["val_kl"] != 0.0
    # the saved model loads and has moved away from the start
    start, after = load_model(model_dir), load_model(tmp_path / "ppo" / "model")
    assert (tmp_path / "ppo" / "model" / "tokenizer.json").exists()
    moved = [not torch.equal(a, b) for a, b in zip(start.parameters(), after.parameters())]
    assert any(moved)
    assert json.loads((tmp_path / "ppo" / "summary.json").read_text())["step"] == 2


def test_interrupted_run_resumes_to_the_uninterrupted_weights(
    micro_pretrained, reward_dir, tmp_path, monkeypatch
):
    _, model_dir = micro_pretrained
    quick = dict(eval_prompts=0, save_every=0)  # no evaluation; checkpoints only when stopping
    whole = ppo.run(_cfg(reward_dir, **quick), model_dir, tmp_path / "whole")
    assert not whole["interrupted"]

    real = ppo.sample_answers

    def ctrl_c_during_first_rollout(*args, **kwargs):  # as if the user pressed Ctrl-C
        monkeypatch.setattr(ppo, "sample_answers", real)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo, "sample_answers", ctrl_c_during_first_rollout)
    cut = ppo.run(_cfg(reward_dir, **quick), model_dir, tmp_path / "split")
    assert cut["interrupted"] and cut["step"] == 1 and "interrupted at step 1" in cut["headline"]
    assert not (tmp_path / "split" / "model").exists()  # only the checkpoint of step 1
    s = ppo.run(_cfg(reward_dir, **quick), model_dir, tmp_path / "split")
    assert s["step"] == 2 and not s["interrupted"]
    a, b = load_model(tmp_path / "whole" / "model"), load_model(tmp_path / "split" / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    rows = [read_metrics(tmp_path / d / "metrics.jsonl") for d in ("whole", "split")]
    rows = [[{k: v for k, v in r.items() if k != "s_per_step"} for r in rs] for rs in rows]
    assert len(rows[0]) == 2 and rows[0] == rows[1]  # rewards, KL, kl_coef, losses: all equal


def test_qa_reward_run(micro_pretrained, tmp_path):
    _, model_dir = micro_pretrained
    path = tmp_path / "qa.jsonl.gz"
    rows = [
        {"question": "What is the capital of France?", "answer": "Paris"},
        {"question": "How many legs does a spider have?", "answer": 8},
        {"question": "中国的首都是哪里？", "answer": "北京"},
        {"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"},
    ]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = PPOConfig(
        sources=[{"name": "qa", "path": str(path)}],
        reward="qa",
        max_steps=1,
        prompts_per_step=2,
        minibatch_size=2,
        ppo_epochs=1,
        max_new_tokens=6,
        seq_len=64,
        val_fraction=0.0,
        device="cpu",
        threads=1,
    )
    s = ppo.run(cfg, model_dir, tmp_path / "ppo")
    assert s["step"] == 1 and s["prompts"] == {"train": 4, "val": 0, "eval": 0}
    row = [r for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl") if "kl" in r][0]
    assert row["correct"] + row["abstain"] + row["wrong"] == pytest.approx(1.0)
    assert row["reward"] in (-1.0, -0.5, 0.0, 0.5, 1.0)  # the mean of two of {1, 0, -1}


def test_outcome_shares_split_answerable_and_unanswerable():
    # made-up prompts and outcomes: two answerable questions, two with no answer
    una = ppo.row_to_prompt({"question": "q", "answer": UNANSWERABLE}, "qa")
    ans = ppo.row_to_prompt({"question": "q", "answer": "Paris"}, "qa")
    prompts, outcomes = [ans, una, ans, una], ["correct", "correct", "abstain", "wrong"]
    assert ppo.outcome_shares(outcomes, prompts, "val_") == {
        "val_correct": 0.5, "val_abstain": 0.25, "val_wrong": 0.25,
        "val_unanswerable_abstain": 0.5,
        "val_answerable_correct": 0.5, "val_answerable_abstain": 0.5, "val_answerable_wrong": 0.0,
    }  # fmt: skip
    # without unanswerable prompts: only the three shares, as before
    assert ppo.outcome_shares(["wrong", "correct"], [ans, ans]) == {
        "correct": 0.5, "abstain": 0.0, "wrong": 0.5,
    }  # fmt: skip
