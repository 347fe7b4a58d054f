"""Multiple-choice scoring: a memorising model scores 100%, a uniform model follows the stated
tie rule, C-Eval scores like CMMLU, --limit takes a stratified sample (the loaders and prompts
are tested in tests/tasks/test_mc_tasks.py)."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.eval.multiple_choice import evaluate_mc, select_rows
from lmforge.model.checkpoint import load_model
from lmforge.model.transformer import GPT
from lmforge.tasks.multiple_choice import MCTask, load_rows, load_task
from lmforge.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def micro(micro_pretrained):
    _, model_dir = micro_pretrained
    return load_model(model_dir), Tokenizer.load(model_dir)


def _memorise(tok, texts, steps=100):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layer=2, n_head=4, max_seq_len=64)
    model = GPT(cfg)
    seqs = [[tok.bos_id] + tok.encode(t) for t in texts]
    T = max(map(len, seqs))
    x = torch.full((len(seqs), T), tok.pad_id)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    y = x[:, 1:].masked_fill(x[:, 1:] == tok.pad_id, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the floor is the first tokens' entropy (which sequence starts), not zero
    assert loss.item() < 0.3, f"did not memorise: loss {loss.item():.3f}"
    return model.eval()


def test_memorising_model_scores_100(micro):
    _, tok = micro
    arc = MCTask(name="arc", format="arc", path=str(DATA / "arc"))
    hs = MCTask(name="hs", format="hellaswag", path=str(DATA / "hellaswag"), prompt="{question}")
    texts = []
    for task in (arc, hs):
        for r in load_rows(task.format, task.path, task.split):
            texts.append(task.prompt.format(question=r["question"]) + " " + r["choices"][r["gold"]])
    model = _memorise(tok, texts)
    for task, n in ((arc, 8), (hs, 4)):
        out = evaluate_mc(model, tok, task, batch_size=5)
        assert out == {
            "task": task.name,
            "acc": 1.0,
            "acc_stderr": 0.0,
            "acc_norm": 1.0,
            "acc_norm_stderr": 0.0,
            "n": n,
            "sample": f"all {n}",
        }


def test_uniform_model_answers_first_choice(micro):
    """All logits equal: every one-token letter " A".." D" scores -log V, and ties go to the
    first choice, so the model answers A and its accuracy is the share of questions whose answer
    is A (near the 1/4 of chance)."""
    model, tok = micro
    uniform = copy.deepcopy(model)
    uniform.lm_head.weight = torch.nn.Parameter(torch.zeros_like(uniform.lm_head.weight))
    assert {len(tok.encode(f" {c}")) for c in "ABCD"} == {1}
    task = MCTask(**{**load_task("mmlu").__dict__, "num_fewshot": 1})
    out = evaluate_mc(uniform, tok, task, limit=100, batch_size=32)
    rows = load_rows(task.format, task.path, task.split)
    golds = [rows[i]["gold"] for i in select_rows(rows, 100, 0, by_subject=True)[0]]
    share_a = sum(g == 0 for g in golds) / 100
    assert out["n"] == 100
    assert out["acc"] == pytest.approx(share_a) and out["acc_norm"] == pytest.approx(share_a)
    assert out["acc_stderr"] == pytest.approx((share_a * (1 - share_a) / 100) ** 0.5)
    assert abs(out["acc"] - 0.25) < 3 * 0.0433  # three standard errors of chance at n = 100


def test_ceval_format(micro_pretrained):
    """C-Eval's csv (id,question,A,B,C,D,answer,explanation) loads and scores like CMMLU."""
    root = Path(__file__).parent / "data" / "ceval"
    rows = load_rows("ceval", root, "val")
    assert [r["gold"] for r in rows] == [0, 1] and rows[0]["choices"][0] == "中国"
    assert rows[0]["question"] == "长城位于哪个国家？" and rows[0]["subject"]
    task = MCTask(name="ceval", format="ceval", path=str(root), split="val", num_fewshot=1)
    model_dir = micro_pretrained[1]
    res = evaluate_mc(load_model(model_dir), Tokenizer.load(model_dir), task)
    assert res["n"] == 2 and 0 <= res["acc"] <= 1


def test_limit_takes_a_stratified_deterministic_sample():
    rows = load_rows("mmlu", "datasets/eval/mmlu", "test")
    index, how = select_rows(rows, 2000, seed=0, by_subject=True)
    assert how == "stratified by subject, seed 0" and len(index) == 2000
    assert index == sorted(set(index))
    assert select_rows(rows, 2000, seed=0, by_subject=True)[0] == index  # same seed, same rows
    assert select_rows(rows, 2000, seed=1, by_subject=True)[0] != index
    size, picked = {}, {}
    for r in rows:
        size[r["subject"]] = size.get(r["subject"], 0) + 1
    for i in index:
        picked[rows[i]["subject"]] = picked.get(rows[i]["subject"], 0) + 1
    assert len(picked) == 57  # every subject, each within one question of its proportional share
    assert all(abs(picked[s] - 2000 * size[s] / len(rows)) < 1 for s in size)
    # 15 rows (the tiny recipe's limit): professional_law's share is 15 * 1534 / 14042 = 1.64, so
    # it gets 1 plus one of the 14 largest remainders (0.64); the other 13 go to the next
    # largest subjects, whose whole share is their remainder
    few = [rows[i]["subject"] for i in select_rows(rows, 15, seed=0, by_subject=True)[0]]
    by_size = sorted(size, key=lambda s: (-size[s], s))
    assert sorted(few) == sorted(["professional_law"] + by_size[:14])
    assert select_rows(rows, 5, 0, by_subject=False) == ([0, 1, 2, 3, 4], "first 5")
    assert select_rows(rows[:3], 5, 0, by_subject=True) == ([0, 1, 2], "all 3")
