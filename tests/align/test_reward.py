"""Reward model: transformers' *ForSequenceClassification reads our checkpoint with our scores;
a synthetic preference is learned; bad preference rows are named by file and line."""

import gzip
import json
import random

import pytest
import torch

from lmforge.align import reward
from lmforge.align.preference import Pair, read_pairs, row_to_pair
from lmforge.config import ModelConfig, PreferenceSourceConfig, RewardConfig
from lmforge.data.readers import DataError
from lmforge.io import atomic_dir
from lmforge.model.transformer import GPT

FAMILIES = {
    "llama": dict(arch="llama", n_kv_head=1, tie_embeddings=False),
    "qwen2": dict(arch="qwen2", qkv_bias=True, tie_embeddings=True),
    "gpt2": dict(
        arch="gpt2", norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, bias=True
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_reads_our_reward_model(family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, dim=32, n_layer=2, n_head=2, max_seq_len=64, **FAMILIES[family]
    )
    rm = reward.RewardModel(GPT(cfg)).eval()
    with atomic_dir(tmp_path / "rm") as d:
        reward.save_reward_model(rm, d, None, pad_token_id=0)
    ids = torch.randint(1, 97, (3, 12))
    lengths = torch.tensor([12, 7, 3])
    ids[1, 7:] = 0  # right padding with pad_token_id
    ids[2, 3:] = 0
    ours = rm(ids, lengths)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == reward.classifier_name(family)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # ~1e-7 in practice
    # and back: a fresh reward model reads the checkpoint to the same scores
    torch.manual_seed(1)
    back = reward.RewardModel(GPT(cfg)).eval()
    reward._read_reward_weights(back, tmp_path / "rm")
    torch.testing.assert_close(back(ids, lengths), ours, rtol=0, atol=0)


def test_bradley_terry_loss_by_hand():
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    want = torch.tensor(
        [-torch.log(torch.sigmoid(torch.tensor(1.0))), torch.log(torch.tensor(2.0))]
    )
    torch.testing.assert_close(reward.bradley_terry_loss(r_c, r_r), want)


def test_layouts_give_the_same_pair():
    hh = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: A pear.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: No.",
    }
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Hi there"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Name a fruit."},
        ],
        "chosen": {"from": "gpt", "value": "A pear."},
        "rejected": {"from": "gpt", "value": "No."},
    }
    plain = {
        "prompt": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a fruit."},
        ],
        "chosen": "A pear.",
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    want = Pair(plain["prompt"], "A pear.", "No.")
    assert row_to_pair(hh) == row_to_pair(sharegpt) == row_to_pair(plain) == want
    assert row_to_pair({"prompt": "Q?", "chosen": "a", "rejected": "b"}, "Be brief.").prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q?"},
    ]


def test_bad_rows_are_named_by_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Q1", "chosen": "yes", "rejected": "no"},
        {"prompt": "Q2", "chosen": "yes"},  # line 2: no rejected
        {"prompt": "Q3", "chosen": "same", "rejected": "same"},  # line 3: identical
        "not json",
        {"prompt": "Q5", "chosen": "", "rejected": "no"},  # line 5: empty answer
    ]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    src = PreferenceSourceConfig(path=str(path))
    with pytest.raises(DataError, match=r"pairs.jsonl:2: missing field 'rejected'"):
        read_pairs(src, ".")
    pairs, problems = read_pairs(src, ".", skip_bad_rows=True)
    assert len(pairs) == 1
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in problems] == ["2", "3", "4", "5"]
    assert "identical" in problems[1] and "invalid JSON" in problems[2] and "empty" in problems[3]


WORDS = "the a red blue cat dog tree house runs sleeps big small river stone quiet loud".split()


def _keyword_pairs(path, n, seed=0):
    """Pairs whose chosen answer contains 'banana' and whose rejected one does not; both
    answers are random words from the same list, so the keyword is the only signal."""
    rng = random.Random(seed)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
            other = [rng.choice(WORDS) for _ in range(len(words))]
            words.insert(rng.randrange(len(words) + 1), "banana")
            row = {
                "prompt": f"Say something, {i}.",
                "chosen": " ".join(words),
                "rejected": " ".join(other),
            }
            f.write(json.dumps(row) + "\n")


def test_reward_model_learns_a_keyword_preference(micro_pretrained, tmp_path):
    recipe, model_dir = micro_pretrained
    _keyword_pairs(tmp_path / "kw.jsonl.gz", 400)
    cfg = RewardConfig(
        sources=[PreferenceSourceConfig(path=str(tmp_path / "kw.jsonl.gz"))],
        max_steps=60,
        batch_size=16,
        seq_len=48,
        max_prompt_len=16,
        lr=3e-3,
        warmup_steps=5,
        eval_every=0,
        save_every=0,
        log_every=10,
        val_fraction=0.2,
        device="cpu",
    )
    s = reward.run(cfg, model_dir, tmp_path / "out")
    assert s["pairs"]["val"] >= 50
    assert s["val_accuracy"] >= 0.9, s
    rm, tok = reward.load_reward_model(tmp_path / "out" / "model")
    prompt = [{"role": "user", "content": "Say something, 7."}]
    good, bad = reward.score_answers(rm, tok, [prompt, prompt], ["the banana runs", "the cat runs"])
    assert good > bad
    assert (tmp_path / "out" / "curves.png").is_file()
